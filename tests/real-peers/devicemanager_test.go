package realpeers

// devhost against the kubelet's own device manager (ManagerImpl from
// pkg/kubelet/cm/devicemanager, with its registration server and plugin
// client from plugin/v1beta1), on a kubelet.sock in a temporary directory.

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/printer"
	"go/token"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	cadvisorapi "github.com/google/cadvisor/lib/model"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

const gpu = "example.com/gpu"

// allSourcesReady is the kubelet's config.SourcesReady once every pod
// source has been seen.
type allSourcesReady struct{}

func (allSourcesReady) AddSource(string) {}
func (allSourcesReady) AllReady() bool   { return true }

// deviceManager is a started ManagerImpl whose registration socket is
// <dir>/kubelet.sock; stopped when the test ends.
func deviceManager(t *testing.T, logger klog.Logger, dir string, pods func() []*v1.Pod) *devicemanager.ManagerImpl {
	t.Helper()
	m, err := newDeviceManager(logger, filepath.Join(dir, "kubelet.sock"), []cadvisorapi.Node{{Id: 0}}, topologymanager.NewFakeManager(logger))
	if err != nil {
		t.Fatalf("the kubelet's device manager: %v", err)
	}
	if err := m.Start(logger, pods, allSourcesReady{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		t.Fatalf("start the kubelet's device manager: %v", err)
	}
	t.Cleanup(func() { _ = m.Stop(logger) })
	return m
}

// expectOptions checks the container options the kubelet's device manager
// hands over: want's envs, annotations and CDI devices (as NAME=value and
// names), and no plain device node or mount (devhost moved them into CDI).
func expectOptions(t *testing.T, what string, opts *devicemanager.DeviceRunContainerOptions, want map[string][]string) {
	t.Helper()
	got := map[string][]string{}
	for _, e := range opts.Envs {
		got["envs"] = append(got["envs"], e.Name+"="+e.Value)
	}
	for _, dev := range opts.Devices {
		got["devices"] = append(got["devices"], dev.PathOnHost+":"+dev.PathInContainer+":"+dev.Permissions)
	}
	for _, m := range opts.Mounts {
		got["mounts"] = append(got["mounts"], fmt.Sprintf("%s:%s:ro=%t", m.HostPath, m.ContainerPath, m.ReadOnly))
	}
	for _, a := range opts.Annotations {
		got["annotations"] = append(got["annotations"], a.Name+"="+a.Value)
	}
	for _, c := range opts.CDIDevices {
		got["CDI devices"] = append(got["CDI devices"], c.Name)
	}
	for _, field := range []string{"envs", "devices", "mounts", "annotations", "CDI devices"} {
		if !slices.Equal(got[field], want[field]) {
			t.Errorf("%s: the kubelet hands the runtime %s %q, want %q", what, field, got[field], want[field])
		}
	}
}

// capacityOf is what the kubelet would put in the Node's status for
// resource: capacity and allocatable.
func capacityOf(m *devicemanager.ManagerImpl, logger klog.Logger, resourceName string) (int64, int64) {
	capacity, allocatable, _ := m.GetCapacity(logger)
	c := capacity[v1.ResourceName(resourceName)]
	a := allocatable[v1.ResourceName(resourceName)]
	return c.Value(), a.Value()
}

func podWanting(uid, resourceName string, count int64) *v1.Pod {
	quantity := *resource.NewQuantity(count, resource.DecimalSI)
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "pod-" + uid, UID: types.UID(uid)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name: "main",
			Resources: v1.ResourceRequirements{
				Limits:   v1.ResourceList{v1.ResourceName(resourceName): quantity},
				Requests: v1.ResourceList{v1.ResourceName(resourceName): quantity},
			},
		}}},
	}
}

// The device plugin path end to end through the kubelet's own code:
// Register (validated by the real registration server), the real client's
// dial (`:authority` localhost), GetDevicePluginOptions, ListAndWatch into
// the node's capacity, health changes, Allocate and PreStartContainer
// through ManagerImpl into the container options the kubelet hands to the
// runtime (with cdi = true: devhost's CDI names, applied as containerd
// applies them, give the container exactly the backend's answer), and a
// kubelet restart (a new ManagerImpl, which deletes every socket in the
// directory) that devhost must notice and register again, after which
// the new kubelet allocates one device and then two.
func TestDeviceManagerRegistersAllocatesAndSurvivesAKubeletRestart(t *testing.T) {
	ctx, logger := testContext(t, 3*wait)
	n := newNode(t)
	// cdi = true: devhost writes a CDI spec for the resource and answers
	// Allocate with its names, each device's node and mount moving there.
	n.staticBackend("gpus", gpu, []string{"gpu-0", "gpu-1"}, "[resources.\""+gpu+"\"]\ncdi = true\n")
	n.hostConfig("")

	var mu sync.Mutex
	var active []*v1.Pod
	pods := func() []*v1.Pod {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(active)
	}
	setActive := func(p ...*v1.Pod) {
		mu.Lock()
		defer mu.Unlock()
		active = p
	}
	m := deviceManager(t, logger, n.path("device-plugins"), pods)
	d := startDevhost(t, n, "devhost.log")

	eventually(t, wait, "the kubelet counts 2 healthy example.com/gpu devices", func() (bool, string) {
		c, a := capacityOf(m, logger, gpu)
		return c == 2 && a == 2, strings.Join([]string{"capacity", resource.NewQuantity(c, resource.DecimalSI).String(), "allocatable", resource.NewQuantity(a, resource.DecimalSI).String()}, " ")
	})
	devices := m.GetAllocatableDevices(logger)[gpu]
	for _, id := range []string{"gpu-0", "gpu-1"} {
		dev, ok := devices[id]
		if !ok {
			t.Fatalf("the kubelet does not know device %s: %v", id, devices)
		}
		if dev.Health != "Healthy" || dev.Topology == nil || len(dev.Topology.Nodes) != 1 || dev.Topology.Nodes[0].ID != 0 {
			t.Errorf("device %s as the kubelet sees it: %v", id, dev)
		}
	}

	// devhost's CDI spec for the resource, as a runtime loads it.
	eventually(t, wait, "a runtime resolves "+gpu+"=gpu-0 and =gpu-1 in devhost's CDI spec", func() (bool, string) {
		return cdiDefines(n.path("cdi"), gpu+"=gpu-0", gpu+"=gpu-1")
	})

	// A health change reaches the kubelet through ListAndWatch.
	n.setHealthy("gpu-0", false)
	eventually(t, wait, "the kubelet sees gpu-0 unhealthy (capacity 2, allocatable 1)", func() (bool, string) {
		c, a := capacityOf(m, logger, gpu)
		return c == 2 && a == 1, ""
	})

	// Admission allocates through the plugin; container start asks for
	// the options (PreStartContainer first, as pre_start = true).
	pod := podWanting("pod-1", gpu, 1)
	setActive(pod)
	container := &pod.Spec.Containers[0]
	if err := m.Allocate(ctx, pod, container, lifecycle.AddOperation); err != nil {
		t.Fatalf("the kubelet's Allocate: %v", err)
	}
	allocated := m.GetDevices(string(pod.UID), container.Name)[gpu]
	if len(allocated) != 1 {
		t.Fatalf("allocated %v, want one device", allocated)
	}
	var id string
	for id = range allocated {
	}
	if id != "gpu-1" {
		t.Errorf("allocated %s, want the only healthy device gpu-1", id)
	}
	opts, err := m.GetDeviceRunContainerOptions(ctx, pod, container)
	if err != nil {
		t.Fatalf("the kubelet's GetDeviceRunContainerOptions (PreStartContainer): %v", err)
	}
	// The CDI names carry the device's node and mount; the variables
	// (DEVHOST_IDS lists the whole allocation) and the annotation stay in
	// the plain fields.
	expectOptions(t, "pod-1's container", opts, map[string][]string{
		"envs":        {"DEVHOST_IDS=" + id},
		"annotations": {"example.com/allocated-by=devhost"},
		"CDI devices": {gpu + "=" + id},
	})
	checkContainer(t, "pod-1's container", n.path("cdi"), runOptions(nil, opts), n.staticAnswer([]string{id}))

	// A kubelet restart: the old manager goes (kubelet.sock removed), a
	// new one deletes every socket in the directory and listens again.
	if err := m.Stop(logger); err != nil {
		t.Fatalf("stop the kubelet's device manager: %v", err)
	}
	m2 := deviceManager(t, logger, n.path("device-plugins"), pods)
	eventually(t, wait, "devhost registers with the restarted kubelet (capacity 2, allocatable 1)", func() (bool, string) {
		c, a := capacityOf(m2, logger, gpu)
		return c == 2 && a == 1, ""
	})
	n.setHealthy("gpu-0", true)
	eventually(t, wait, "the restarted kubelet sees gpu-0 healthy again", func() (bool, string) {
		c, a := capacityOf(m2, logger, gpu)
		return c == 2 && a == 2, ""
	})
	// The restarted kubelet allocates too (its checkpoint holds pod-1's
	// device, so the new pod gets the other one).
	pod2 := podWanting("pod-2", gpu, 1)
	setActive(pod, pod2)
	if err := m2.Allocate(ctx, pod2, &pod2.Spec.Containers[0], lifecycle.AddOperation); err != nil {
		t.Fatalf("Allocate through the restarted kubelet: %v", err)
	}
	if got := slices.Sorted(maps.Keys(m2.GetDevices(string(pod2.UID), "main")[gpu])); !slices.Equal(got, []string{"gpu-0"}) {
		t.Errorf("the restarted kubelet allocated %q, want gpu-0 (its checkpoint holds pod-1's gpu-1)", got)
	}
	opts2, err := m2.GetDeviceRunContainerOptions(ctx, pod2, &pod2.Spec.Containers[0])
	if err != nil {
		t.Fatalf("GetDeviceRunContainerOptions through the restarted kubelet: %v", err)
	}
	checkContainer(t, "pod-2's container", n.path("cdi"), runOptions(nil, opts2), n.staticAnswer([]string{"gpu-0"}))

	// Two devices in one container (pod-1 and pod-2 gone, so both are
	// free): two CDI names, one variable listing both.
	pod3 := podWanting("pod-3", gpu, 2)
	setActive(pod3)
	if err := m2.Allocate(ctx, pod3, &pod3.Spec.Containers[0], lifecycle.AddOperation); err != nil {
		t.Fatalf("Allocate two devices: %v", err)
	}
	both := slices.Sorted(maps.Keys(m2.GetDevices(string(pod3.UID), "main")[gpu]))
	if !slices.Equal(both, []string{"gpu-0", "gpu-1"}) {
		t.Fatalf("allocated %v, want gpu-0 and gpu-1", both)
	}
	opts3, err := m2.GetDeviceRunContainerOptions(ctx, pod3, &pod3.Spec.Containers[0])
	if err != nil {
		t.Fatalf("GetDeviceRunContainerOptions for two devices: %v", err)
	}
	var names []string
	for _, c := range opts3.CDIDevices {
		names = append(names, c.Name)
	}
	slices.Sort(names)
	if want := []string{gpu + "=gpu-0", gpu + "=gpu-1"}; !slices.Equal(names, want) || len(opts3.Devices) != 0 || len(opts3.Mounts) != 0 {
		t.Errorf("pod-3's container: CDI devices %q, plain devices %v, mounts %v; want %q and no plain device or mount", names, opts3.Devices, opts3.Mounts, want)
	}
	var wants []backendAnswer
	for _, order := range orders(both) {
		wants = append(wants, n.staticAnswer(order))
	}
	checkContainer(t, "pod-3's container (two devices)", n.path("cdi"), runOptions(nil, opts3), wants...)

	t.Logf("devhost exited %v after SIGTERM", d.stop())
}

// The kubelet function that newDeviceManager links to still has the
// signature declared in kubelet_internal.go, types resolved to their
// packages (a mismatch would not fail the build, only corrupt memory at
// run time).
func TestDeviceManagerConstructorSignature(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes").Output()
	if err != nil {
		t.Fatalf("go list -m k8s.io/kubernetes: %v", err)
	}
	const kubeletPkg = "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	kubelet := funcSignature(t, filepath.Join(strings.TrimSpace(string(out)), "pkg", "kubelet", "cm", "devicemanager", "manager.go"), "newManagerImpl", kubeletPkg)
	ours := funcSignature(t, "kubelet_internal.go", "newDeviceManager", "devhost.test/realpeers")
	if kubelet != ours {
		t.Fatalf("the kubelet's newManagerImpl is now\n  %s\nkubelet_internal.go declares\n  %s\nupdate the declaration", kubelet, ours)
	}
}

// funcSignature is the parameter and result types of the top-level func
// name in file, each qualified by its package's import path (local types
// by pkg).
func funcSignature(t *testing.T, file, name, pkg string) string {
	t.Helper()
	parsed, err := parser.ParseFile(token.NewFileSet(), file, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	imports := map[string]string{}
	for _, spec := range parsed.Imports {
		path := strings.Trim(spec.Path.Value, `"`)
		alias := path[strings.LastIndex(path, "/")+1:]
		if spec.Name != nil {
			alias = spec.Name.Name
		}
		imports[alias] = path
	}
	var render func(ast.Expr) string
	render = func(e ast.Expr) string {
		switch e := e.(type) {
		case *ast.Ident:
			if token.IsExported(e.Name) {
				return pkg + "." + e.Name
			}
			return e.Name
		case *ast.SelectorExpr:
			return imports[e.X.(*ast.Ident).Name] + "." + e.Sel.Name
		case *ast.StarExpr:
			return "*" + render(e.X)
		case *ast.ArrayType:
			return "[]" + render(e.Elt)
		default:
			var buf bytes.Buffer
			_ = printer.Fprint(&buf, token.NewFileSet(), e)
			return "?" + buf.String()
		}
	}
	list := func(fields *ast.FieldList) string {
		var types []string
		for _, f := range fields.List {
			for range max(1, len(f.Names)) {
				types = append(types, render(f.Type))
			}
		}
		return "(" + strings.Join(types, ", ") + ")"
	}
	for _, decl := range parsed.Decls {
		if fn, ok := decl.(*ast.FuncDecl); ok && fn.Recv == nil && fn.Name.Name == name {
			return "func" + list(fn.Type.Params) + " " + list(fn.Type.Results)
		}
	}
	t.Fatalf("%s: no func %s", file, name)
	return ""
}
