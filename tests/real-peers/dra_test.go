package realpeers

// devhost as a DRA driver against the kubelet's own plugin watcher
// (pkg/kubelet/pluginmanager) and DRA manager (pkg/kubelet/cm/dra, with its
// plugin client and health stream handling), and the real API server.

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	drahealthv1alpha1 "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1"
	pluginregistration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// driver is devhost's default DRA driver name for example.com/gpu.
const driver = "gpu.example.com"

// draResource serves example.com/gpu through DRA (a backends.d table).
const draResource = "[resources.\"example.com/gpu\"]\napi = \"dra\"\n"

// draSettings is the body of devhost.toml's [dra] table for node name,
// with n's directory as the kubelet root.
func draSettings(n *node, nodeName, kubeconfig string, taints bool) string {
	return fmt.Sprintf("kubelet_root = %q\nnode_name = %q\nkubeconfig = %q\ndevice_taints = %t\n", n.root, nodeName, kubeconfig, taints)
}

// registration is one successful RegisterPlugin through the plugin watcher.
type registration struct {
	name, endpoint string
	versions       []string
}

// recordingHandler wraps the kubelet's DRA handler and records what the
// plugin watcher hands it: the tests' window on registration.
type recordingHandler struct {
	inner cache.PluginHandler

	mu         sync.Mutex
	log        []string
	registered []registration
}

func (h *recordingHandler) note(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.log = append(h.log, fmt.Sprintf(format, args...))
}

func (h *recordingHandler) ValidatePlugin(ctx context.Context, name, endpoint string, versions []string) error {
	err := h.inner.ValidatePlugin(ctx, name, endpoint, versions)
	h.note("ValidatePlugin(%s, %s, %q): %v", name, endpoint, versions, err)
	return err
}

func (h *recordingHandler) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	err := h.inner.RegisterPlugin(ctx, name, endpoint, versions, timeout)
	h.note("RegisterPlugin(%s, %s, %q): %v", name, endpoint, versions, err)
	if err == nil {
		h.mu.Lock()
		h.registered = append(h.registered, registration{name, endpoint, versions})
		h.mu.Unlock()
	}
	return err
}

func (h *recordingHandler) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	h.inner.DeRegisterPlugin(ctx, name, endpoint)
	h.note("DeRegisterPlugin(%s, %s)", name, endpoint)
}

// waitRegistered waits until the kubelet's DRA handler has registered
// name and returns the registration. On a timeout the failure quotes what
// the plugin watcher logged last about the registration socket (its
// operation executor logs through klog's global logger).
func (h *recordingHandler) waitRegistered(t *testing.T, d *devhost, name string) registration {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		h.mu.Lock()
		for _, r := range h.registered {
			if r.name == name {
				h.mu.Unlock()
				return r
			}
		}
		calls := slices.Clone(h.log)
		h.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("the kubelet's plugin watcher did not register DRA driver %s in %v (GetInfo → ValidatePlugin → RegisterPlugin → NotifyRegistrationStatus).\n"+
				"handler calls: %q\nthe watcher's last error: %s\n%s", name, wait, calls, lastGlobalLog("plugins_registry"), d.exitNote())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runningPods is the pods the DRA kubelet's manager sees as running (its
// active-pods callback), set by a test as its pods come and go.
type runningPods struct {
	mu   sync.Mutex
	pods []*v1.Pod
}

func (r *runningPods) set(pods ...*v1.Pod) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pods = pods
}

func (r *runningPods) list() []*v1.Pod {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.pods)
}

// draKubelet is the DRA half of a kubelet: its plugin manager watching
// <root>/plugins_registry with the DRA manager as the "DRAPlugin" handler.
type draKubelet struct {
	manager *dra.Manager
	handler *recordingHandler
	stop    func()
}

// startDRAKubelet starts the kubelet's DRA manager (state in
// <root>/state, as a restarted kubelet finds it) and plugin manager.
// getNode gates the manager's start-up wipe of the node's ResourceSlices:
// the wipe runs once getNode answers.
func startDRAKubelet(t *testing.T, ctx context.Context, logger klog.Logger, n *node, client kubernetes.Interface, getNode dra.GetNodeFunc, pods func() []*v1.Pod) *draKubelet {
	t.Helper()
	manager, err := dra.NewManager(logger, client, n.path("state"))
	if err != nil {
		t.Fatalf("the kubelet's DRA manager: %v", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	if err := manager.Start(ctx, pods, getNode, allSourcesReady{}); err != nil {
		cancel()
		t.Fatalf("start the kubelet's DRA manager: %v", err)
	}
	handler := &recordingHandler{inner: manager.GetWatcherHandler()}
	// A FakeRecorder without a channel drops the events.
	plugins := pluginmanager.NewPluginManager(n.path("plugins_registry"), &record.FakeRecorder{})
	plugins.AddHandler(pluginregistration.DRAPlugin, handler)
	stopCh := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		plugins.Run(ctx, allSourcesReady{}, stopCh)
	}()
	k := &draKubelet{manager: manager, handler: handler}
	k.stop = sync.OnceFunc(func() {
		close(stopCh)
		cancel()
		manager.Stop()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("the kubelet's plugin manager did not stop in 10 s")
		}
	})
	t.Cleanup(k.stop)
	return k
}

// nodeGetter is the kubelet's GetNodeFunc for nodeName; when gate is not
// nil it answers only once gate is closed.
func nodeGetter(client kubernetes.Interface, nodeName string, gate <-chan struct{}) dra.GetNodeFunc {
	return func(ctx context.Context) (*v1.Node, error) {
		if gate != nil {
			select {
			case <-gate:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	}
}

// slicesOf lists the driver's ResourceSlices on nodeName.
func slicesOf(ctx context.Context, client kubernetes.Interface, nodeName, driverName string) ([]resourceapi.ResourceSlice, error) {
	list, err := client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{
		FieldSelector: resourceapi.ResourceSliceSelectorNodeName + "=" + nodeName + "," + resourceapi.ResourceSliceSelectorDriver + "=" + driverName,
	})
	if err != nil {
		return nil, err
	}
	return list.Items, nil
}

// publishedDevices is the sorted device names of the driver's slices.
func publishedDevices(ctx context.Context, client kubernetes.Interface, nodeName, driverName string) ([]string, string) {
	slices, err := slicesOf(ctx, client, nodeName, driverName)
	if err != nil {
		return nil, err.Error()
	}
	var names []string
	for _, s := range slices {
		for _, d := range s.Spec.Devices {
			names = append(names, d.Name)
		}
	}
	sort.Strings(names)
	return names, fmt.Sprintf("%d slices, devices %q", len(slices), names)
}

// awaitKubeletWipe creates a slice of another driver on nodeName and waits
// until the kubelet's start-up wipe (all drivers of the node) has deleted
// it: from then on the wipe cannot hit devhost's slices.
func awaitKubeletWipe(t *testing.T, ctx context.Context, client kubernetes.Interface, nodeName string, start func()) {
	t.Helper()
	sentinel := &resourceapi.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "sentinel-"},
		Spec: resourceapi.ResourceSliceSpec{
			Driver:   "sentinel.devhost.test",
			Pool:     resourceapi.ResourcePool{Name: nodeName, ResourceSliceCount: 1},
			NodeName: &nodeName,
		},
	}
	created, err := client.ResourceV1().ResourceSlices().Create(ctx, sentinel, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("a sentinel ResourceSlice: %v", err)
	}
	start()
	eventually(t, wait, "the kubelet's start-up wipe deletes the node's slices", func() (bool, string) {
		_, err := client.ResourceV1().ResourceSlices().Get(ctx, created.Name, metav1.GetOptions{})
		return err != nil, fmt.Sprint(err)
	})
}

// claimFor creates a ResourceClaim whose one request "gpus" is allocated
// devices on nodeName's pool of the driver and reserved for a pod, as the
// scheduler leaves it, and returns that pod (not created: the kubelet code
// takes it as given).
func claimFor(t *testing.T, ctx context.Context, client kubernetes.Interface, nodeName, name string, devices ...string) (*resourceapi.ResourceClaim, *v1.Pod) {
	t.Helper()
	// As the scheduler writes it for a node-local device.
	selector := &v1.NodeSelector{NodeSelectorTerms: []v1.NodeSelectorTerm{{
		MatchFields: []v1.NodeSelectorRequirement{{Key: "metadata.name", Operator: v1.NodeSelectorOpIn, Values: []string{nodeName}}},
	}}}
	return claimSelecting(t, ctx, client, nodeName, selector, name, devices...)
}

// claimSelecting is claimFor with the allocation's node selector given.
func claimSelecting(t *testing.T, ctx context.Context, client kubernetes.Interface, nodeName string, selector *v1.NodeSelector, name string, devices ...string) (*resourceapi.ResourceClaim, *v1.Pod) {
	t.Helper()
	claim, err := client.ResourceV1().ResourceClaims("default").Create(ctx, &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{{
			Name: "gpus",
			Exactly: &resourceapi.ExactDeviceRequest{
				DeviceClassName: driver,
				AllocationMode:  resourceapi.DeviceAllocationModeExactCount,
				Count:           int64(len(devices)),
			},
		}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("ResourceClaim %s: %v", name, err)
	}
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "pod-" + name, UID: types.UID("uid-pod-" + name)},
		Spec: v1.PodSpec{
			NodeName:       nodeName,
			ResourceClaims: []v1.PodResourceClaim{{Name: "gpu", ResourceClaimName: &claim.Name}},
			Containers:     []v1.Container{{Name: "main", Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: "gpu"}}}}},
		},
	}
	var results []resourceapi.DeviceRequestAllocationResult
	for _, device := range devices {
		results = append(results, resourceapi.DeviceRequestAllocationResult{Request: "gpus", Driver: driver, Pool: nodeName, Device: device})
	}
	claim.Status = resourceapi.ResourceClaimStatus{
		Allocation: &resourceapi.AllocationResult{
			Devices:      resourceapi.DeviceAllocationResult{Results: results},
			NodeSelector: selector,
		},
		ReservedFor: []resourceapi.ResourceClaimConsumerReference{{Resource: "pods", Name: pod.Name, UID: pod.UID}},
	}
	claim, err = client.ResourceV1().ResourceClaims("default").UpdateStatus(ctx, claim, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("allocate ResourceClaim %s: %v", name, err)
	}
	return claim, pod
}

// healthOf is the device health the kubelet would write into the pod's
// status (allocatedResourcesStatus): the health of each entry, and the
// entries in full for messages.
func healthOf(m *dra.Manager, logger klog.Logger, pod *v1.Pod) ([]string, string) {
	status := &v1.PodStatus{ContainerStatuses: []v1.ContainerStatus{{Name: "main"}}}
	m.UpdateAllocatedResourcesStatus(logger, pod, status)
	var health, entries []string
	for _, rs := range status.ContainerStatuses[0].AllocatedResourcesStatus {
		for _, r := range rs.Resources {
			health = append(health, string(r.Health))
			entries = append(entries, fmt.Sprintf("%s: %s=%s", rs.Name, r.ResourceID, r.Health))
		}
	}
	return health, fmt.Sprintf("%q", entries)
}

// vendorKind is the CDI kind of the DRA test's backend's own names (its
// cdi_kind), which a vendor spec in the node's CDI directory defines.
const vendorKind = "vendor.example.com/gpu"

// vendorSpec writes a vendor's CDI spec of vendorKind into the node's CDI
// directory, defining ids: each gives the container an extra device node
// and a variable of its own (vendorAnswer).
func vendorSpec(n *node, ids []string) {
	n.t.Helper()
	text := "cdiVersion: \"0.6.0\"\nkind: " + vendorKind + "\ndevices:\n"
	for _, id := range ids {
		a := vendorAnswer([]string{id})
		var env []string
		for name, value := range a.Env {
			env = append(env, fmt.Sprintf("%q", name+"="+value))
		}
		d := a.Devices[0]
		text += fmt.Sprintf("- name: %q\n  containerEdits:\n    env: [%s]\n    deviceNodes: [{path: %q, hostPath: %q, permissions: %q}]\n",
			id, strings.Join(env, ", "), d.ContainerPath, d.HostPath, d.Permissions)
	}
	n.write("cdi/vendor-gpu.yaml", text)
}

// vendorAnswer is what vendorSpec's devices ids give a container.
func vendorAnswer(ids []string) backendAnswer {
	a := backendAnswer{Env: map[string]string{}}
	for _, id := range ids {
		a.Env["VENDOR_"+strings.ToUpper(strings.ReplaceAll(id, "-", "_"))] = id
		a.Devices = append(a.Devices, answerDevice{HostPath: "/dev/zero", ContainerPath: "/dev/vendor-" + id, Permissions: "rw"})
	}
	return a
}

// claimNames is the CDI names the kubelet's DRA manager hands the runtime
// for pod's container.
func claimNames(t *testing.T, m *dra.Manager, pod *v1.Pod) (*dra.ContainerInfo, []string) {
	t.Helper()
	info, err := m.GetResources(pod, &pod.Spec.Containers[0])
	if err != nil {
		t.Fatalf("the kubelet's GetResources: %v", err)
	}
	var names []string
	for _, c := range info.CDIDevices {
		names = append(names, c.Name)
		if !cdiName.MatchString(c.Name) {
			t.Errorf("CDI device ID %q is not vendor/class=name", c.Name)
		}
	}
	return info, names
}

var cdiName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]*/[A-Za-z][A-Za-z0-9_.-]*=[A-Za-z0-9][A-Za-z0-9_.:-]*$`)

// The DRA path through the kubelet's own code: the plugin watcher's
// GetInfo (grpc-go, percent-encoded socket path as :authority), the DRA
// manager's validation and registration, NotifyRegistrationStatus; slices
// published as devhost's ServiceAccount (deploy/ RBAC) and accepted by the
// real API server; a claim prepared by the DRA manager (which reads it from
// the API server, as devhost does) into CDI device IDs (the claim's own and
// the backend's, which a vendor spec defines) that containerd's CDI
// library turns into exactly the backend's answer, for one device and for
// a request of two; health into the pod
// status the 1.37 way; unprepare; and a kubelet restart whose start-up wipe
// of the node's slices lands after devhost registered again (as seen on a
// real node): the slices must be back within seconds.
func TestDRADriverThroughTheKubeletsPluginWatcherAndDRAManager(t *testing.T) {
	a := realAPIServer(t)
	ctx, logger := testContext(t, 4*time.Minute)
	const nodeName = "node-dra"
	a.node(t, ctx, nodeName)
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)
	// The backend names its devices vendor.example.com/gpu=<id> too (its
	// cdi_kind), which a vendor's spec defines: devhost passes them on.
	vendorSpec(n, []string{"gpu-0", "gpu-1"})
	n.staticBackendNamed("gpus", gpu, vendorKind, []string{"gpu-0", "gpu-1"}, draResource)
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))

	var active runningPods
	var k *draKubelet
	awaitKubeletWipe(t, ctx, a.admin, nodeName, func() {
		k = startDRAKubelet(t, ctx, logger, n, a.admin, nodeGetter(a.admin, nodeName, nil), active.list)
	})
	d := startDevhost(t, n, "devhost.log")

	reg := k.handler.waitRegistered(t, d, driver)
	t.Logf("registered: endpoint %s, supported versions %q", reg.endpoint, reg.versions)
	series := fmt.Sprintf("devhost_dra_registered{driver=%q}", driver)
	eventually(t, wait, "devhost hears NotifyRegistrationStatus(registered) ("+series+" 1)", func() (bool, string) {
		v := d.metric(series)
		return v == "1", "value " + v
	})
	eventually(t, wait, "devhost's /readyz answers 200", func() (bool, string) {
		code, body := d.get("/readyz")
		return code == 200, fmt.Sprint(code, " ", body)
	})
	eventually(t, wait, "the real API server holds the driver's slices with gpu-0 and gpu-1", func() (bool, string) {
		names, note := publishedDevices(ctx, a.admin, nodeName, driver)
		return slices.Equal(names, []string{"gpu-0", "gpu-1"}), note
	})

	// Prepare, as the kubelet does before it creates the pod's containers.
	claim, pod := claimFor(t, ctx, a.admin, nodeName, "claim-one", "gpu-1")
	active.set(pod)
	if err := k.manager.PrepareResources(ctx, pod); err != nil {
		t.Fatalf("the kubelet's PrepareResources: %v", err)
	}
	info, ids := claimNames(t, k.manager, pod)
	t.Logf("CDI devices for the container: %q", ids)
	// The claim's own CDI device (the request's whole answer), then the
	// backend's name, which the vendor spec defines.
	claimDevice := "k8s." + driver + "/claim=" + string(claim.UID) + "-gpus"
	if want := []string{claimDevice, vendorKind + "=gpu-1"}; !slices.Equal(ids, want) {
		t.Errorf("CDI devices %q, want %q", ids, want)
	}
	specs, _ := filepath.Glob(n.path("cdi", "*"+string(claim.UID)+"*.json"))
	if len(specs) != 1 {
		t.Errorf("CDI spec files for claim %s: %q, want one", claim.UID, specs)
	}
	// What containerd makes of the names: the backend's answer for gpu-1
	// (variable, device node, mount) and the vendor's edits for it.
	checkContainer(t, "claim-one's container", n.path("cdi"), runOptions(info, nil),
		n.staticAnswer([]string{"gpu-1"}).plus(vendorAnswer([]string{"gpu-1"})))

	// Health, the 1.37 way: the kubelet opens the stream it picked from
	// supported_versions and writes what it hears into the pod status.
	if !slices.Contains(reg.versions, "v1.DRAResourceHealth") && !slices.Contains(reg.versions, "v1alpha1.DRAResourceHealth") {
		t.Errorf("supported_versions %q offer no DRAResourceHealth: a 1.37 kubelet opens no health stream", reg.versions)
	} else {
		// One entry: the claim's device gpu-1 (named by its first CDI ID).
		eventually(t, wait, "the kubelet reports the claim's device Healthy in the pod status", func() (bool, string) {
			h, note := healthOf(k.manager, logger, pod)
			return slices.Equal(h, []string{"Healthy"}), note
		})
		n.setHealthy("gpu-1", false)
		eventually(t, wait, "the kubelet reports the claim's device Unhealthy in the pod status", func() (bool, string) {
			h, note := healthOf(k.manager, logger, pod)
			return slices.Equal(h, []string{"Unhealthy"}), note
		})
		n.setHealthy("gpu-1", true)
	}

	// Unprepare, as the kubelet does once the pod is gone.
	active.set()
	if err := k.manager.UnprepareResources(ctx, pod); err != nil {
		t.Fatalf("the kubelet's UnprepareResources: %v", err)
	}
	if left, _ := filepath.Glob(n.path("cdi", "*"+string(claim.UID)+"*.json")); len(left) != 0 {
		t.Errorf("CDI spec files left after unprepare: %q", left)
	}

	// A request of two devices: one CDI device carrying the request's
	// whole answer, and both of the backend's names. The kubelet lists a
	// request's names once per device; the runtime applies each once.
	claim2, pod2 := claimFor(t, ctx, a.admin, nodeName, "claim-two", "gpu-0", "gpu-1")
	active.set(pod2)
	if err := k.manager.PrepareResources(ctx, pod2); err != nil {
		t.Fatalf("the kubelet's PrepareResources (two devices): %v", err)
	}
	info2, ids2 := claimNames(t, k.manager, pod2)
	t.Logf("CDI devices for the two-device container: %q", ids2)
	distinct := slices.Compact(slices.Sorted(slices.Values(ids2)))
	want2 := []string{"k8s." + driver + "/claim=" + string(claim2.UID) + "-gpus", vendorKind + "=gpu-0", vendorKind + "=gpu-1"}
	if !slices.Equal(distinct, want2) {
		t.Errorf("distinct CDI devices %q, want %q", distinct, want2)
	}
	var wants []backendAnswer
	for _, order := range orders([]string{"gpu-0", "gpu-1"}) {
		wants = append(wants, n.staticAnswer(order).plus(vendorAnswer(order)))
	}
	checkContainer(t, "claim-two's container (two devices)", n.path("cdi"), runOptions(info2, nil), wants...)
	active.set()
	if err := k.manager.UnprepareResources(ctx, pod2); err != nil {
		t.Fatalf("the kubelet's UnprepareResources (two devices): %v", err)
	}

	// A kubelet restart. The new kubelet finds devhost's registration
	// socket and registers the driver; its start-up wipe of the node's
	// slices is held until then.
	eventually(t, wait, "the slices are back after gpu-1's health change", func() (bool, string) {
		names, note := publishedDevices(ctx, a.admin, nodeName, driver)
		return slices.Equal(names, []string{"gpu-0", "gpu-1"}), note
	})
	k.stop()
	watcher, err := a.admin.ResourceV1().ResourceSlices().Watch(ctx, metav1.ListOptions{
		FieldSelector: resourceapi.ResourceSliceSelectorNodeName + "=" + nodeName + "," + resourceapi.ResourceSliceSelectorDriver + "=" + driver,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Stop()
	gate := make(chan struct{})
	k2 := startDRAKubelet(t, ctx, logger, n, a.admin, nodeGetter(a.admin, nodeName, gate), active.list)
	k2.handler.waitRegistered(t, d, driver)
	close(gate)
	deleted := false
	timeout := time.After(wait)
	for !deleted {
		select {
		case event, ok := <-watcher.ResultChan():
			if !ok {
				t.Fatal("the slice watch ended")
			}
			deleted = event.Type == watch.Deleted
		case <-timeout:
			t.Fatal("the restarted kubelet's wipe never deleted the driver's slices")
		}
	}
	wiped := time.Now()
	eventually(t, 15*time.Second, "devhost publishes its slices again after the kubelet's late wipe", func() (bool, string) {
		names, note := publishedDevices(ctx, a.admin, nodeName, driver)
		return slices.Equal(names, []string{"gpu-0", "gpu-1"}), note
	})
	t.Logf("slices back %v after the wipe", time.Since(wiped).Round(time.Millisecond))
}

// Health as a 1.36 kubelet asks for it: it opens
// /v1alpha1.DRAResourceHealth/NodeWatchResources on every registered DRA
// plugin, whatever supported_versions lists, on the DRA socket with
// grpc.NewClient("unix:"+path) (as its DRA plugin client does). The first
// answer carries every device; a health change follows on the stream.
func TestDRAHealthStreamAsA136KubeletOpensIt(t *testing.T) {
	a := realAPIServer(t)
	ctx, _ := testContext(t, 2*time.Minute)
	const nodeName = "node-health"
	a.node(t, ctx, nodeName)
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)
	n.staticBackend("gpus", gpu, []string{"gpu-0", "gpu-1"}, draResource)
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))
	d := startDevhost(t, n, "devhost.log")

	var socket string
	eventually(t, wait, "devhost serves the driver's DRA socket in <root>/plugins/"+driver, func() (bool, string) {
		found, _ := filepath.Glob(n.path("plugins", driver, "*.sock"))
		if len(found) == 1 {
			socket = found[0]
			return true, ""
		}
		return false, fmt.Sprintf("sockets %q; %s", found, d.exitNote())
	})
	conn, err := grpc.NewClient("unix:"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	streamCtx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	stream, err := drahealthv1alpha1.NewDRAResourceHealthClient(conn).NodeWatchResources(streamCtx, &drahealthv1alpha1.NodeWatchResourcesRequest{})
	if err != nil {
		t.Fatalf("open /v1alpha1.DRAResourceHealth/NodeWatchResources: %v", err)
	}
	health := map[string]string{}
	receive := func() {
		t.Helper()
		answer, err := stream.Recv()
		if err != nil {
			t.Fatalf("/v1alpha1.DRAResourceHealth/NodeWatchResources (what a 1.36 kubelet opens on every DRA plugin): %v", err)
		}
		for _, dh := range answer.GetDevices() {
			health[dh.GetDevice().GetPoolName()+"/"+dh.GetDevice().GetDeviceName()] = dh.GetHealth().String()
		}
	}
	receive()
	want := map[string]string{nodeName + "/gpu-0": "HEALTHY", nodeName + "/gpu-1": "HEALTHY"}
	if fmt.Sprint(health) != fmt.Sprint(want) {
		t.Fatalf("first health answer %v, want %v", health, want)
	}
	n.setHealthy("gpu-0", false)
	for health[nodeName+"/gpu-0"] != "UNHEALTHY" {
		receive()
	}
}

// sliceWrites counts what happens to the slices of a watch.
type sliceWrites struct {
	mu     sync.Mutex
	events []string
}

func (w *sliceWrites) record(events <-chan watch.Event) {
	for event := range events {
		s, ok := event.Object.(*resourceapi.ResourceSlice)
		if !ok {
			continue
		}
		w.mu.Lock()
		w.events = append(w.events, fmt.Sprintf("%s %s generation %d resourceVersion %s", event.Type, s.Name, s.Generation, s.ResourceVersion))
		w.mu.Unlock()
	}
}

func (w *sliceWrites) list() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.events)
}

// Slices as the real API server takes them (devhost's ServiceAccount with
// deploy/'s RBAC; validation of names, attributes, taints), and no write
// when nothing changes: with device_taints = true the server defaults each
// taint's timeAdded, which devhost must not count as a difference. Watched
// from before devhost starts, through quiet periods and a devhost restart:
// one ADDED per slice, nothing else.
func TestResourceSlicesAreAcceptedAndStayQuietWithTaints(t *testing.T) {
	const quiet = 25 * time.Second
	a := realAPIServer(t)
	ctx, _ := testContext(t, 3*time.Minute)
	const nodeName = "node-quiet"
	a.node(t, ctx, nodeName)
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)
	n.staticBackend("gpus", gpu, []string{"gpu-0", "gpu-1", "gpu-2"}, draResource)
	n.setHealthy("gpu-2", false)
	n.hostConfig(draSettings(n, nodeName, kubeconfig, true))

	watcher, err := a.admin.ResourceV1().ResourceSlices().Watch(ctx, metav1.ListOptions{
		FieldSelector: resourceapi.ResourceSliceSelectorNodeName + "=" + nodeName,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Stop()
	writes := &sliceWrites{}
	go writes.record(watcher.ResultChan())

	d := startDevhost(t, n, "devhost.log")
	eventually(t, wait, "the slices hold gpu-0..2, gpu-2 tainted, the taint's timeAdded set by the server", func() (bool, string) {
		list, err := slicesOf(ctx, a.admin, nodeName, driver)
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, s := range list {
			for _, dev := range s.Spec.Devices {
				var taints []string
				for _, taint := range dev.Taints {
					taints = append(taints, fmt.Sprintf("%s:%s(timeAdded %v)", taint.Key, taint.Effect, taint.TimeAdded != nil))
				}
				seen = append(seen, dev.Name+strings.Join(taints, ","))
			}
		}
		sort.Strings(seen)
		want := []string{"gpu-0", "gpu-1", "gpu-2devhost.io/unhealthy:NoSchedule(timeAdded true)"}
		return slices.Equal(seen, want), fmt.Sprintf("%q", seen)
	})
	time.Sleep(quiet)
	took := d.stop()
	t.Logf("devhost exited %v after SIGTERM", took.Round(time.Millisecond))
	d2 := startDevhost(t, n, "devhost-restarted.log")
	eventually(t, wait, "the restarted devhost reads its slices (devhost_dra_slices_up 1)", func() (bool, string) {
		v := d2.metric(fmt.Sprintf("devhost_dra_slices_up{driver=%q}", driver))
		return v == "1", "value " + v
	})
	time.Sleep(quiet)

	list, err := slicesOf(ctx, a.admin, nodeName, driver)
	if err != nil {
		t.Fatal(err)
	}
	events := writes.list()
	var added int
	var other []string
	for _, e := range events {
		if strings.HasPrefix(e, string(watch.Added)+" ") {
			added++
		} else {
			other = append(other, e)
		}
	}
	if added != len(list) || len(other) != 0 {
		t.Errorf("want one ADDED per slice (%d) and no other write; the server saw:\n  %s", len(list), strings.Join(events, "\n  "))
	}
	for _, s := range list {
		if s.Generation != 1 {
			t.Errorf("slice %s is at generation %d, want 1 (nothing changed)", s.Name, s.Generation)
		}
	}
}
