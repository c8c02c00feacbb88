// Command cdi-inject does for one container what containerd 2.2 and CRI-O
// do with the kubelet's answer: it builds the container's OCI runtime spec
// from the plain fields (envs, device nodes, mounts), then applies the CDI
// names with the library both runtimes use (tags.cncf.io/container-device-
// interface, pkg/cdi). The Rust end-to-end tests use it as an oracle for
// what a container really gets from devhost's answers.
//
//	cdi-inject [--spec-dir DIR]... < container.json
//
// Input (any field may be missing):
//
//	{"envs": {"NAME": "value"},
//	 "devices": [{"container_path": "/dev/x", "host_path": "/dev/null", "permissions": "rw"}],
//	 "mounts": [{"container_path": "/x", "host_path": "/y", "read_only": true}],
//	 "cdi_devices": ["vendor.com/class=name"]}
//
// Output: one JSON object (see result). The exit status is 0 whether or not
// injection worked, so that a test can assert on a refusal; it is non-zero
// only for bad flags or input that is not JSON.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"devhost.test/realpeers/internal/ocidevices"
)

type input struct {
	Envs    map[string]string `json:"envs"`
	Devices []struct {
		ContainerPath string `json:"container_path"`
		HostPath      string `json:"host_path"`
		Permissions   string `json:"permissions"`
	} `json:"devices"`
	Mounts []struct {
		ContainerPath string `json:"container_path"`
		HostPath      string `json:"host_path"`
		ReadOnly      bool   `json:"read_only"`
	} `json:"mounts"`
	CDIDevices []string `json:"cdi_devices"`
}

type device struct {
	Path   string `json:"path"`
	Type   string `json:"type"`
	Major  int64  `json:"major"`
	Minor  int64  `json:"minor"`
	Access string `json:"access"`
}

type mount struct {
	Destination string   `json:"destination"`
	Source      string   `json:"source"`
	Options     []string `json:"options"`
}

type result struct {
	SpecErrors    []string          `json:"spec_errors"`
	Unresolved    []string          `json:"unresolved"`
	Error         string            `json:"error"`
	Env           []string          `json:"env"`
	Devices       []device          `json:"devices"`
	Mounts        []mount           `json:"mounts"`
	DevicesByName map[string]string `json:"devices_by_name"`
}

// specDirs is the repeatable --spec-dir flag, lowest priority first (the
// order of containerd's cdi_spec_dirs: a later directory wins a conflict).
type specDirs []string

func (d *specDirs) String() string     { return strings.Join(*d, ",") }
func (d *specDirs) Set(v string) error { *d = append(*d, v); return nil }

func main() {
	var dirs specDirs
	flag.Var(&dirs, "spec-dir", "a CDI spec directory, lowest priority first (repeatable)")
	flag.Parse()
	if flag.NArg() != 0 {
		fail("unexpected arguments %q", flag.Args())
	}
	var in input
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields() // a misspelt field would silently test nothing
	if err := dec.Decode(&in); err != nil {
		fail("input: %v", err)
	}

	out := result{SpecErrors: []string{}, Unresolved: []string{}, DevicesByName: map[string]string{}}
	spec, err := plainSpec(&in)
	if err != nil {
		// containerd refuses the container before it looks at CDI names.
		out.Error = err.Error()
	}

	// Auto-refresh off: no fsnotify watcher, one scan of the directories now.
	var cache *cdi.Cache
	if perr := guard(func() {
		cache, _ = cdi.NewCache(cdi.WithSpecDirs(dirs...), cdi.WithAutoRefresh(false))
	}); perr != nil {
		out.Error = perr.Error()
		describe(spec, &out)
		emit(&out)
		return
	}
	if err == nil && len(in.CDIDevices) > 0 {
		var unresolved []string
		perr := guard(func() { unresolved, err = cache.InjectDevices(spec, in.CDIDevices...) })
		out.Unresolved = append(out.Unresolved, unresolved...)
		if perr != nil {
			err = perr
		}
		if err != nil {
			out.Error = err.Error()
		}
	}
	for _, name := range in.CDIDevices {
		if dev := cache.GetDevice(name); dev != nil {
			out.DevicesByName[name] = dev.GetSpec().GetPath()
		}
	}
	// A conflict is recorded under both files' paths with the same text:
	// report each distinct message once.
	for _, errs := range cache.GetErrors() {
		for _, e := range errs {
			out.SpecErrors = append(out.SpecErrors, e.Error())
		}
	}
	sort.Strings(out.SpecErrors)
	out.SpecErrors = slices.Compact(out.SpecErrors)

	describe(spec, &out)
	emit(&out)
}

// guard turns a panic of the library into an error: v1.1.0's name
// validation indexes out of range on a one-character vendor or class in a
// spec file, inside the runtime's own call; a test should see that as a
// refusal, not as a broken oracle.
func guard(call func()) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("cdi library panicked: %v", p)
		}
	}()
	call()
	return nil
}

func emit(out *result) {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fail("output: %v", err)
	}
}

// plainSpec is the spec containerd builds from the kubelet's plain fields
// before CDI: the env, each device node as found on the host (type and
// numbers from the node itself, a cgroup allow rule with the plugin's
// permissions) and each mount as a bind mount. The returned spec is usable
// even with an error (it holds what was built so far).
func plainSpec(in *input) (*oci.Spec, error) {
	spec := &oci.Spec{
		Process: &oci.Process{},
		// The runtime's default: every device denied unless allowed below.
		Linux: &oci.Linux{Resources: &oci.LinuxResources{
			Devices: []oci.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
		}},
	}
	// The kubelet's envs are a map: sort for a stable order (the runtime
	// gets them in map order, and names are unique either way).
	names := make([]string, 0, len(in.Envs))
	for name := range in.Envs {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		spec.Process.Env = append(spec.Process.Env, name+"="+in.Envs[name])
	}
	for _, m := range in.Mounts {
		mode := "rw"
		if m.ReadOnly {
			mode = "ro"
		}
		spec.Mounts = append(spec.Mounts, oci.Mount{
			Destination: m.ContainerPath, Type: "bind", Source: m.HostPath, Options: []string{"rbind", mode},
		})
	}
	for _, d := range in.Devices {
		// Lstat, as containerd's DeviceFromPath: a link is not a device.
		var st unix.Stat_t
		if err := unix.Lstat(d.HostPath, &st); err != nil {
			return spec, fmt.Errorf("device %q: %w", d.HostPath, err)
		}
		var kind string
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			kind = "c"
		case unix.S_IFBLK:
			kind = "b"
		default:
			return spec, fmt.Errorf("device %q: not a device node", d.HostPath)
		}
		ocidevices.AddPlain(spec, d.ContainerPath, kind, int64(unix.Major(uint64(st.Rdev))), int64(unix.Minor(uint64(st.Rdev))), d.Permissions)
	}
	return spec, nil
}

// describe copies what the container gets out of the final spec.
func describe(spec *oci.Spec, out *result) {
	out.Env = append([]string{}, spec.Process.Env...)
	out.Devices = []device{}
	for _, d := range spec.Linux.Devices {
		out.Devices = append(out.Devices, device{
			Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor, Access: ocidevices.Access(spec, d),
		})
	}
	out.Mounts = []mount{}
	for _, m := range spec.Mounts {
		out.Mounts = append(out.Mounts, mount{Destination: m.Destination, Source: m.Source, Options: m.Options})
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cdi-inject: "+format+"\n", args...)
	os.Exit(2)
}
