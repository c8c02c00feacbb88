package realpeers

// What a container runtime makes of what the kubelet hands it for one
// container, in process: the steps of containerd 2.2 (its CRI plugin) with
// the CDI library it links, tags.cncf.io/container-device-interface v1.1.0
// (CRI-O links the same). The plain fields (envs, device nodes, mounts)
// become the container's OCI spec; the CDI names, the CRI field's and then
// those of `cdi.k8s.io/` annotations, each once, are injected from the
// node's CDI directory. The container that results is set against the
// backend's answer: devhost may split an answer between plain fields and
// CDI names, but the container must get exactly what the backend said.

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	kubecontainer "k8s.io/kubernetes/pkg/kubelet/container"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"devhost.test/realpeers/internal/ocidevices"
)

// answerDevice is a device node of a backend's answer.
type answerDevice struct {
	HostPath, ContainerPath, Permissions string
}

// answerMount is a mount of a backend's answer.
type answerMount struct {
	HostPath, ContainerPath string
	ReadOnly                bool
}

// backendAnswer is what a backend's answer for one container edits in it.
type backendAnswer struct {
	Env     map[string]string
	Devices []answerDevice
	Mounts  []answerMount
}

// plus is a followed by b (a variable of b replaces a's).
func (a backendAnswer) plus(b backendAnswer) backendAnswer {
	sum := backendAnswer{Env: map[string]string{}}
	for _, from := range []backendAnswer{a, b} {
		for name, value := range from.Env {
			sum.Env[name] = value
		}
		sum.Devices = append(sum.Devices, from.Devices...)
		sum.Mounts = append(sum.Mounts, from.Mounts...)
	}
	return sum
}

// asPlainFields is a as the kubelet would hand it over had the backend's
// whole answer travelled in the plain fields.
func (a backendAnswer) asPlainFields() *kubecontainer.RunContainerOptions {
	opts := &kubecontainer.RunContainerOptions{}
	for name, value := range a.Env {
		opts.Envs = append(opts.Envs, kubecontainer.EnvVar{Name: name, Value: value})
	}
	for _, d := range a.Devices {
		opts.Devices = append(opts.Devices, kubecontainer.DeviceInfo{PathOnHost: d.HostPath, PathInContainer: d.ContainerPath, Permissions: d.Permissions})
	}
	for _, m := range a.Mounts {
		opts.Mounts = append(opts.Mounts, kubecontainer.Mount{Name: m.ContainerPath, ContainerPath: m.ContainerPath, HostPath: m.HostPath, ReadOnly: m.ReadOnly})
	}
	return opts
}

// runOptions is what the kubelet's container manager hands the runtime
// for a container (its GetResources): the DRA manager's CDI names, then
// the device manager's options. Either may be nil.
func runOptions(claims *dra.ContainerInfo, devices *devicemanager.DeviceRunContainerOptions) *kubecontainer.RunContainerOptions {
	opts := &kubecontainer.RunContainerOptions{}
	if claims != nil {
		opts.CDIDevices = append(opts.CDIDevices, claims.CDIDevices...)
	}
	if devices != nil {
		opts.Devices = append(opts.Devices, devices.Devices...)
		opts.Mounts = append(opts.Mounts, devices.Mounts...)
		opts.Envs = append(opts.Envs, devices.Envs...)
		opts.Annotations = append(opts.Annotations, devices.Annotations...)
		opts.CDIDevices = append(opts.CDIDevices, devices.CDIDevices...)
	}
	return opts
}

// containerView is what a container gets, as lines: "env NAME=value",
// "device PATH TYPE MAJOR:MINOR ACCESS", "mount DEST <- SOURCE ro|rw
// bind|not-bind" and "other ..." for any other edit (hooks, groups,
// network devices), sorted; a line twice is a thing given twice.
type containerView []string

// runtimeResult is the runtime's work for one container.
type runtimeResult struct {
	// View is what the container gets.
	View containerView
	// Names are the CDI names injected, each once, in order.
	Names []string
	// DefinedIn is the spec file that defines each name.
	DefinedIn map[string]string
	// SpecErrors are the CDI library's complaints about spec files (a
	// runtime logs them; a name only the faulty spec defines is
	// unresolvable).
	SpecErrors []string
}

// asRuntime is what a container runtime does with opts, reading the CDI
// spec directories dirs (lowest priority first). An error is a container
// the runtime refuses: a plain device that is not a device node, a bad CDI
// annotation, an unresolvable CDI name, a failed injection.
func asRuntime(opts *kubecontainer.RunContainerOptions, dirs ...string) (runtimeResult, error) {
	return inject(opts, true, dirs)
}

// inject is asRuntime; with skipRepeats false, the CRI field's names go
// to the CDI library as given, repeats included (a runtime that does not
// skip them, as containerd 2.2 does).
func inject(opts *kubecontainer.RunContainerOptions, skipRepeats bool, dirs []string) (runtimeResult, error) {
	r := runtimeResult{DefinedIn: map[string]string{}}
	spec, err := specFromPlainFields(opts)
	if err != nil {
		return r, err
	}
	// containerd's WithCDI: the CRI field's names, then the annotations',
	// skipping a name seen before (the kubelet repeats a claim's name for
	// each of its devices).
	seen := map[string]bool{}
	add := func(name string) {
		if !seen[name] {
			seen[name] = true
			r.Names = append(r.Names, name)
		}
	}
	for _, d := range opts.CDIDevices {
		if skipRepeats {
			add(d.Name)
		} else {
			seen[d.Name] = true
			r.Names = append(r.Names, d.Name)
		}
	}
	annotations := map[string]string{}
	for _, a := range opts.Annotations {
		annotations[a.Name] = a.Value
	}
	_, annotated, err := cdi.ParseAnnotations(annotations)
	if err != nil {
		return r, fmt.Errorf("CDI device annotations: %w", err)
	}
	sort.Strings(annotated) // they come out in map order
	for _, name := range annotated {
		add(name)
	}
	if len(r.Names) > 0 {
		err = recovered(func() error {
			// One scan of the directories now; no fsnotify watcher.
			cache, _ := cdi.NewCache(cdi.WithSpecDirs(dirs...), cdi.WithAutoRefresh(false))
			for path, errs := range cache.GetErrors() {
				for _, e := range errs {
					r.SpecErrors = append(r.SpecErrors, path+": "+e.Error())
				}
			}
			sort.Strings(r.SpecErrors)
			r.SpecErrors = slices.Compact(r.SpecErrors)
			for _, name := range r.Names {
				if d := cache.GetDevice(name); d != nil {
					r.DefinedIn[name] = d.GetSpec().GetPath()
				}
			}
			unresolved, err := cache.InjectDevices(spec, r.Names...)
			if len(unresolved) != 0 {
				return fmt.Errorf("CDI names %q resolve in no spec of %q: %w", unresolved, dirs, err)
			}
			return err
		})
		if err != nil {
			return r, err
		}
	}
	r.View = viewOf(spec)
	return r, nil
}

// recovered runs call, turning a panic into an error: the CDI library
// v1.1.0 panics inside the runtime's call on some spec files (a one-letter
// vendor or class).
func recovered(call func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("the CDI library panicked: %v", p)
		}
	}()
	return call()
}

// specFromPlainFields is the OCI spec containerd builds from the plain
// fields before CDI: the envs in order; each device node as the host has
// it (its link resolved, then its type and numbers read), with a cgroup
// rule allowing the given permissions; each mount as a bind mount.
func specFromPlainFields(opts *kubecontainer.RunContainerOptions) (*oci.Spec, error) {
	spec := &oci.Spec{
		Process: &oci.Process{},
		// The runtime's default: every device denied unless a rule allows it.
		Linux: &oci.Linux{Resources: &oci.LinuxResources{
			Devices: []oci.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
		}},
	}
	for _, e := range opts.Envs {
		spec.Process.Env = append(spec.Process.Env, e.Name+"="+e.Value)
	}
	for _, m := range opts.Mounts {
		mode := "rw"
		if m.ReadOnly {
			mode = "ro"
		}
		spec.Mounts = append(spec.Mounts, oci.Mount{
			Destination: m.ContainerPath, Source: m.HostPath, Type: "bind", Options: []string{"rbind", "rprivate", mode},
		})
	}
	for _, d := range opts.Devices {
		host, err := filepath.EvalSymlinks(d.PathOnHost)
		if err != nil {
			return nil, fmt.Errorf("device %s: %w", d.PathOnHost, err)
		}
		var st unix.Stat_t
		if err := unix.Lstat(host, &st); err != nil {
			return nil, fmt.Errorf("device %s: %w", d.PathOnHost, err)
		}
		kind := map[uint32]string{unix.S_IFCHR: "c", unix.S_IFBLK: "b"}[st.Mode&unix.S_IFMT]
		if kind == "" {
			return nil, fmt.Errorf("device %s is not a device node", d.PathOnHost)
		}
		ocidevices.AddPlain(spec, d.PathInContainer, kind, int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev)), d.Permissions)
	}
	return spec, nil
}

// viewOf is what a container with spec gets.
func viewOf(spec *oci.Spec) containerView {
	var lines containerView
	env := map[string]string{}
	for _, entry := range spec.Process.Env {
		// runc (and crun) let the last entry of a name win.
		name, value, _ := strings.Cut(entry, "=")
		env[name] = value
	}
	for name, value := range env {
		lines = append(lines, "env "+name+"="+value)
	}
	for _, d := range spec.Linux.Devices {
		lines = append(lines, fmt.Sprintf("device %s %s %d:%d %s", d.Path, d.Type, d.Major, d.Minor, ocidevices.Access(spec, d)))
	}
	for _, m := range spec.Mounts {
		mode, bind := "rw", "not-bind"
		if slices.Contains(m.Options, "ro") {
			mode = "ro"
		}
		if m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind") {
			bind = "bind"
		}
		lines = append(lines, fmt.Sprintf("mount %s <- %s %s %s", m.Destination, m.Source, mode, bind))
	}
	if h := spec.Hooks; h != nil {
		for what, hooks := range map[string][]oci.Hook{
			"prestart": h.Prestart, "createRuntime": h.CreateRuntime, "createContainer": h.CreateContainer,
			"startContainer": h.StartContainer, "poststart": h.Poststart, "poststop": h.Poststop,
		} {
			for _, hook := range hooks {
				lines = append(lines, fmt.Sprintf("other %s hook %s %q", what, hook.Path, hook.Args))
			}
		}
	}
	for _, gid := range spec.Process.User.AdditionalGids {
		lines = append(lines, fmt.Sprintf("other additional group %d", gid))
	}
	for name := range spec.Linux.NetDevices {
		lines = append(lines, "other network device "+name)
	}
	if spec.Linux.IntelRdt != nil {
		lines = append(lines, "other Intel RDT settings")
	}
	sort.Strings(lines)
	return lines
}

// compareContainer is "" when the container r describes gets exactly what
// one of wants says, else what differs from the first of them.
func compareContainer(r runtimeResult, wants ...backendAnswer) string {
	var first containerView
	for i, want := range wants {
		spec, err := specFromPlainFields(want.asPlainFields())
		if err != nil {
			return fmt.Sprintf("the backend's answer itself cannot be a container: %v", err)
		}
		view := viewOf(spec)
		if slices.Equal(view, r.View) {
			return ""
		}
		if i == 0 {
			first = view
		}
	}
	onlyContainer, onlyAnswer := multisetDiff(r.View, first)
	var b strings.Builder
	fmt.Fprintf(&b, "the container differs from the backend's answer")
	if len(wants) > 1 {
		fmt.Fprintf(&b, " (in each of the %d orders of its devices; against the first)", len(wants))
	}
	fmt.Fprintf(&b, ":\n    only in the container:\n      %s\n    only in the backend's answer:\n      %s\n    the container gets:\n      %s",
		orNothing(onlyContainer), orNothing(onlyAnswer), orNothing(r.View))
	return b.String()
}

func orNothing(lines []string) string {
	if len(lines) == 0 {
		return "(nothing)"
	}
	return strings.Join(lines, "\n      ")
}

// multisetDiff is what a has more of than b, and b more of than a.
func multisetDiff(a, b []string) ([]string, []string) {
	count := map[string]int{}
	for _, line := range a {
		count[line]++
	}
	for _, line := range b {
		count[line]--
	}
	var onlyA, onlyB []string
	for line, n := range count {
		for ; n > 0; n-- {
			onlyA = append(onlyA, line)
		}
		for ; n < 0; n++ {
			onlyB = append(onlyB, line)
		}
	}
	sort.Strings(onlyA)
	sort.Strings(onlyB)
	return onlyA, onlyB
}

// checkContainer fails the test unless a runtime reading only cdiDir
// accepts the container opts describes (every CDI name resolves, every
// spec file there is sound) and the container gets exactly what the
// backend answered: want, or one of wants (the kubelet asks for devices
// in no fixed order, and a backend's answer follows the order asked).
func checkContainer(t *testing.T, what, cdiDir string, opts *kubecontainer.RunContainerOptions, wants ...backendAnswer) runtimeResult {
	t.Helper()
	r, err := asRuntime(opts, cdiDir)
	if err != nil {
		t.Errorf("%s: a container runtime would refuse the container: %v\n  CDI names %q; spec files: %s\n  the kubelet's options: %s",
			what, err, r.Names, specFiles(cdiDir), describeOptions(opts))
		return r
	}
	if len(r.SpecErrors) != 0 {
		t.Errorf("%s: the CDI library finds errors in the spec files of %s:\n  %s", what, cdiDir, strings.Join(r.SpecErrors, "\n  "))
	}
	if diff := compareContainer(r, wants...); diff != "" {
		t.Errorf("%s: %s\n  the kubelet's options: %s\n  CDI names defined in: %v", what, diff, describeOptions(opts), r.DefinedIn)
		return r
	}
	if len(r.Names) < len(opts.CDIDevices) {
		// The kubelet repeated names: a runtime that passes the repeats to
		// the CDI library (which then applies a device's edits once per
		// naming) must build the same container.
		again, err := inject(opts, false, []string{cdiDir})
		switch {
		case err != nil:
			t.Errorf("%s: with the kubelet's repeated CDI names passed on as given, the runtime would refuse the container: %v", what, err)
		case !slices.Equal(again.View, r.View):
			onlyRepeating, onlyOnce := multisetDiff(again.View, r.View)
			t.Errorf("%s: with the kubelet's repeated CDI names passed on as given the container differs:\n    only with repeats:\n      %s\n    only with each name once:\n      %s",
				what, orNothing(onlyRepeating), orNothing(onlyOnce))
		}
	}
	t.Logf("%s: the runtime's container matches the backend's answer (CDI names %q from %v)", what, r.Names, r.DefinedIn)
	return r
}

func specFiles(dir string) string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err.Error()
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return fmt.Sprintf("%q", names)
}

// describeOptions is opts' fields the runtime reads, for messages.
func describeOptions(opts *kubecontainer.RunContainerOptions) string {
	return fmt.Sprintf("envs %v, devices %v, mounts %v, annotations %v, CDI devices %v",
		opts.Envs, opts.Devices, opts.Mounts, opts.Annotations, opts.CDIDevices)
}

// cdiDefines is whether a runtime reading only dir resolves every name,
// and if not, a note on what it finds.
func cdiDefines(dir string, names ...string) (bool, string) {
	cache, _ := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	for _, name := range names {
		if cache.GetDevice(name) == nil {
			return false, fmt.Sprintf("%s unresolved; devices %q, spec errors %v, files %s", name, cache.ListDevices(), cache.GetErrors(), specFiles(dir))
		}
	}
	return true, ""
}

// orders is every order of ids (for the few devices a test allocates).
func orders(ids []string) [][]string {
	if len(ids) <= 1 {
		return [][]string{slices.Clone(ids)}
	}
	var all [][]string
	for i, first := range ids {
		rest := slices.Concat(ids[:i], ids[i+1:])
		for _, tail := range orders(rest) {
			all = append(all, append([]string{first}, tail...))
		}
	}
	return all
}

// The checker itself, on hand-made specs: it accepts what matches, and
// sees a wrong value, a missing edit, an unresolvable name and a refused
// spec; a name repeated or given by annotation is applied once.
func TestTheRuntimeCheckSeesWhatTheContainerGets(t *testing.T) {
	dir := t.TempDir()
	spec := `{"cdiVersion": "0.6.0", "kind": "example.com/gpu", "devices": [
	  {"name": "gpu-0", "containerEdits": {
	    "deviceNodes": [{"path": "/dev/gpu-0", "hostPath": "/dev/null", "permissions": "rw"}],
	    "mounts": [{"hostPath": "/data/0", "containerPath": "/data/gpu-0", "options": ["rbind", "ro"]}]}},
	  {"name": "gpu-1", "containerEdits": {
	    "deviceNodes": [{"path": "/dev/gpu-1", "hostPath": "/dev/zero", "permissions": "rw"}]}}]}`
	if err := os.WriteFile(filepath.Join(dir, "gpu.json"), []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	answer := backendAnswer{
		Env: map[string]string{"IDS": "gpu-0,gpu-1"},
		Devices: []answerDevice{
			{HostPath: "/dev/null", ContainerPath: "/dev/gpu-0", Permissions: "rw"},
			{HostPath: "/dev/zero", ContainerPath: "/dev/gpu-1", Permissions: "rw"},
		},
		Mounts: []answerMount{{HostPath: "/data/0", ContainerPath: "/data/gpu-0", ReadOnly: true}},
	}
	split := &kubecontainer.RunContainerOptions{
		Envs:        []kubecontainer.EnvVar{{Name: "IDS", Value: "gpu-0,gpu-1"}},
		Annotations: []kubecontainer.Annotation{{Name: "cdi.k8s.io/test", Value: "example.com/gpu=gpu-1"}},
		CDIDevices:  []kubecontainer.CDIDevice{{Name: "example.com/gpu=gpu-0"}, {Name: "example.com/gpu=gpu-0"}},
	}
	r, err := asRuntime(split, dir)
	if err != nil {
		t.Fatalf("asRuntime: %v", err)
	}
	if diff := compareContainer(r, answer); diff != "" {
		t.Errorf("the split answer: %s", diff)
	}
	if !slices.Equal(r.Names, []string{"example.com/gpu=gpu-0", "example.com/gpu=gpu-1"}) {
		t.Errorf("names injected %q: want each once, the annotation's after the field's", r.Names)
	}
	if r.DefinedIn["example.com/gpu=gpu-1"] != filepath.Join(dir, "gpu.json") {
		t.Errorf("defined in %v", r.DefinedIn)
	}

	wrong := answer.plus(backendAnswer{Env: map[string]string{"IDS": "gpu-1,gpu-0"}})
	if diff := compareContainer(r, wrong); !strings.Contains(diff, "env IDS=gpu-1,gpu-0") {
		t.Errorf("a wrong variable: %q", diff)
	}
	if diff := compareContainer(r, wrong, answer); diff != "" {
		t.Errorf("one of two answers matches: %q", diff)
	}
	more := answer.plus(backendAnswer{Mounts: []answerMount{{HostPath: "/x", ContainerPath: "/y"}}})
	if diff := compareContainer(r, more); !strings.Contains(diff, "mount /y <- /x rw bind") {
		t.Errorf("a missing mount: %q", diff)
	}
	less := answer
	less.Mounts = nil
	if diff := compareContainer(r, less); !strings.Contains(diff, "mount /data/gpu-0 <- /data/0 ro bind") {
		t.Errorf("a mount given beyond the answer: %q", diff)
	}

	unresolved := &kubecontainer.RunContainerOptions{CDIDevices: []kubecontainer.CDIDevice{{Name: "example.com/gpu=gpu-9"}}}
	if _, err := asRuntime(unresolved, dir); err == nil || !strings.Contains(err.Error(), "example.com/gpu=gpu-9") {
		t.Errorf("an unresolvable name: %v", err)
	}
	notANode := &kubecontainer.RunContainerOptions{Devices: []kubecontainer.DeviceInfo{{PathOnHost: filepath.Join(dir, "gpu.json"), PathInContainer: "/dev/x"}}}
	if _, err := asRuntime(notANode, dir); err == nil || !strings.Contains(err.Error(), "not a device node") {
		t.Errorf("a plain device that is no device node: %v", err)
	}
	if got := orders([]string{"a", "b", "c"}); len(got) != 6 || !slices.Equal(got[5], []string{"c", "b", "a"}) {
		t.Errorf("orders: %q", got)
	}
}
