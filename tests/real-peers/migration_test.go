package realpeers

// The move from device plugin to DRA (KEP-5004, DRA extended resources):
// the same pod spec, asking for example.com/gpu in resources.limits, is
// scheduled by the real scheduler and admitted by the kubelet's own device
// manager and DRA manager before and after devhost's backend file switches
// to api = "dra" and the DeviceClass `devhost deviceclass` prints is
// applied; both containers, built as containerd builds them, must be the
// same.

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
	"k8s.io/kubernetes/pkg/scheduler"
	"k8s.io/kubernetes/pkg/scheduler/profile"
)

// startScheduler runs the real kube-scheduler (pkg/scheduler with its
// default profile, the in-tree plugins and the feature gates of its
// release, as cmd/kube-scheduler builds it, without its HTTP endpoints and
// leader election) against the API server until the test ends. It
// returns what the scheduler sees: its own informers, which may lag behind
// the API server.
func startScheduler(t *testing.T, ctx context.Context, client kubernetes.Interface) informers.SharedInformerFactory {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	broadcaster := events.NewBroadcaster(&events.EventSinkImpl{Interface: client.EventsV1()})
	broadcaster.StartRecordingToSink(ctx.Done())
	factory := scheduler.NewInformerFactory(client, 0, nil)
	sched, err := scheduler.New(ctx, client, factory, nil, profile.NewRecorderFactory(broadcaster))
	if err != nil {
		cancel()
		t.Fatalf("the real scheduler: %v", err)
	}
	factory.Start(ctx.Done())
	for informer, synced := range factory.WaitForCacheSync(ctx.Done()) {
		if !synced {
			cancel()
			t.Fatalf("the scheduler's informer for %v did not sync", informer)
		}
	}
	if err := sched.WaitForHandlersSync(ctx); err != nil {
		cancel()
		t.Fatalf("the scheduler's event handlers did not sync: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sched.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		broadcaster.Shutdown()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("the scheduler did not stop in 10 s")
		}
	})
	return factory
}

// schedulerSeesAllocatable waits until the scheduler's own view of node
// nodeName lists resource with capacity and allocatable as given. The
// Node in the API server is not enough: the scheduler decides from its
// informer, and under load that lags; a pod created before it caught up
// could be bound by the stale allocatable (through the device plugin
// instead of DRA).
func schedulerSeesAllocatable(t *testing.T, seen informers.SharedInformerFactory, nodeName string, resourceName v1.ResourceName, capacity, allocatable int64) {
	t.Helper()
	lister := seen.Core().V1().Nodes().Lister()
	eventually(t, wait, fmt.Sprintf("the scheduler sees %s on node %s with capacity %d, allocatable %d", resourceName, nodeName, capacity, allocatable), func() (bool, string) {
		node, err := lister.Get(nodeName)
		if err != nil {
			return false, err.Error()
		}
		c, a := node.Status.Capacity[resourceName], node.Status.Allocatable[resourceName]
		return c.Value() == capacity && a.Value() == allocatable, fmt.Sprintf("capacity %s, allocatable %s", c.String(), a.String())
	})
}

// publishNodeStatus writes the Node's capacity and allocatable as the
// kubelet's node status setter does: the machine's (fixed here: 4 CPUs,
// 8 GiB, 110 pods) plus what the device manager reports for device plugin
// resources, a resource the device manager has dropped removed. Returns
// what the Node says for resourceName: capacity and allocatable.
func publishNodeStatus(t *testing.T, ctx context.Context, client kubernetes.Interface, nodeName string, m *devicemanager.ManagerImpl, logger klog.Logger, resourceName string) (int64, int64) {
	t.Helper()
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("node %s: %v", nodeName, err)
	}
	// The API server taints a new Node not-ready; the node lifecycle
	// controller (not run here) lifts the taint once the kubelet says
	// Ready, as it does here.
	if len(node.Spec.Taints) != 0 {
		node.Spec.Taints = nil
		if node, err = client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("node %s's taints: %v", nodeName, err)
		}
	}
	machine := v1.ResourceList{
		v1.ResourceCPU:    resource.MustParse("4"),
		v1.ResourceMemory: resource.MustParse("8Gi"),
		v1.ResourcePods:   resource.MustParse("110"),
	}
	capacity, allocatable, removed := m.GetCapacity(logger)
	node.Status.Capacity = machine.DeepCopy()
	node.Status.Allocatable = machine.DeepCopy()
	maps.Copy(node.Status.Capacity, capacity)
	maps.Copy(node.Status.Allocatable, allocatable)
	for _, name := range removed {
		delete(node.Status.Capacity, v1.ResourceName(name))
		delete(node.Status.Allocatable, v1.ResourceName(name))
	}
	node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now()}}
	updated, err := client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("node %s's status: %v", nodeName, err)
	}
	c := updated.Status.Capacity[v1.ResourceName(resourceName)]
	a := updated.Status.Allocatable[v1.ResourceName(resourceName)]
	return c.Value(), a.Value()
}

// gpuPod is the pod spec of both sides of the move: one container asking
// for one example.com/gpu in resources.limits, nothing DRA-specific.
func gpuPod(name string) *v1.Pod {
	one := resource.MustParse("1")
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name:      "main",
			Image:     "registry.invalid/app:1",
			Resources: v1.ResourceRequirements{Limits: v1.ResourceList{gpu: one}},
		}}},
	}
}

// scheduled creates pod and waits until the real scheduler has bound it to
// nodeName and until ready accepts it; returns the pod as the API server
// holds it (what the kubelet receives). On a timeout it quotes the
// scheduler's events for the pod.
func scheduled(t *testing.T, ctx context.Context, client kubernetes.Interface, pod *v1.Pod, nodeName string, ready func(*v1.Pod) bool) *v1.Pod {
	t.Helper()
	created, err := client.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("pod %s: %v", pod.Name, err)
	}
	t.Cleanup(func() {
		_ = client.CoreV1().Pods(pod.Namespace).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	})
	var got *v1.Pod
	eventually(t, wait, "the real scheduler binds pod "+pod.Name+" to "+nodeName, func() (bool, string) {
		got, err = client.CoreV1().Pods(pod.Namespace).Get(ctx, created.Name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		if got.Spec.NodeName == nodeName && ready(got) {
			return true, ""
		}
		return false, fmt.Sprintf("nodeName %q, extendedResourceClaimStatus %+v; scheduler events: %s",
			got.Spec.NodeName, got.Status.ExtendedResourceClaimStatus, eventsFor(ctx, client, got))
	})
	return got
}

// eventsFor is the reasons and notes of the events about pod.
func eventsFor(ctx context.Context, client kubernetes.Interface, pod *v1.Pod) string {
	list, err := client.EventsV1().Events(pod.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "regarding.name=" + pod.Name})
	if err != nil {
		return err.Error()
	}
	var notes []string
	for _, e := range list.Items {
		notes = append(notes, e.Reason+": "+e.Note)
	}
	return fmt.Sprintf("%q", notes)
}

// applyDeviceClasses applies what `devhost deviceclass <dir>` prints and
// returns the classes (deleted when the test ends).
func applyDeviceClasses(t *testing.T, ctx context.Context, client kubernetes.Interface, dir string) []*resourceapi.DeviceClass {
	t.Helper()
	cmd := exec.Command(devhostBinary(t), "deviceclass", dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("devhost deviceclass %s: %v\n%s", dir, err, stderr.String())
	}
	var classes []*resourceapi.DeviceClass
	for _, doc := range strings.Split(string(out), "\n---") {
		if strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(doc), "---")) == "" {
			continue
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("devhost deviceclass printed what the client cannot decode: %v\n%s", err, doc)
		}
		class, ok := obj.(*resourceapi.DeviceClass)
		if !ok {
			t.Fatalf("devhost deviceclass printed a %T, want resource.k8s.io/v1 DeviceClass", obj)
		}
		created, err := client.ResourceV1().DeviceClasses().Create(ctx, class, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("apply DeviceClass %s: %v", class.Name, err)
		}
		t.Cleanup(func() {
			_ = client.ResourceV1().DeviceClasses().Delete(context.Background(), created.Name, metav1.DeleteOptions{})
		})
		classes = append(classes, created)
	}
	return classes
}

// noPreStart turns pre_start off in the backends.d file name that
// staticBackend wrote.
func noPreStart(n *node, name string) {
	n.t.Helper()
	path := n.path("config", "backends.d", name+".toml")
	data, err := os.ReadFile(path)
	if err != nil {
		n.t.Fatal(err)
	}
	text := string(data)
	if !strings.Contains(text, "pre_start = true\n") {
		n.t.Fatalf("%s has no pre_start = true line to turn off", path)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(text, "pre_start = true\n", "pre_start = false\n", 1)), 0o644); err != nil {
		n.t.Fatal(err)
	}
}

// The move from device plugin to DRA with the real components: the real
// scheduler (1.37, KEP-5004 GA), the kubelet's device manager and DRA
// manager (with its plugin watcher), the real API server. Before: devhost
// serves example.com/gpu as a device plugin; the kubelet reports it in the
// Node's allocatable; the scheduler binds a pod asking for it in
// resources.limits; the device manager allocates through devhost. The
// move: the backend file gets api = "dra", devhost restarts, the DeviceClass
// `devhost deviceclass` prints is applied; the Node still lists the
// resource (capacity 1, allocatable 0: the kubelet keeps a plugin's
// resource for 5 minutes after it goes). After: the same pod spec is bound
// by the scheduler with an extended-resource claim it allocated from
// devhost's slices; the device manager leaves the resource to DRA; the DRA
// manager prepares the claim through devhost. What the kubelet hands the
// runtime for each container, built as containerd 2.2 builds it, must be
// the backend's answer, and the same before and after.
func TestMigrationFromDevicePluginToDRAKeepsTheContainersDevice(t *testing.T) {
	a := realAPIServer(t)
	ctx, logger := testContext(t, 4*time.Minute)
	const nodeName = "node-migrate"
	a.node(t, ctx, nodeName)
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)
	// One device, so that both sides must give the container the same one.
	ids := []string{"gpu-0"}
	n.staticBackend("gpus", gpu, ids, "[resources.\""+gpu+"\"]\ncdi = true\n")
	// Without PreStartContainer: the kubelet v1.37.2 keeps a gone plugin's
	// options for the 5 minutes' grace, and if they ask for
	// PreStartContainer its GetDeviceRunContainerOptions refuses a
	// container whose resource is now DRA-backed ("no devices found
	// allocated in local cache"; fixed upstream by kubernetes#141426).
	noPreStart(n, "gpus")
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))

	// The kubelet: its device manager and its DRA manager, running
	// throughout, with the pods bound to the node as its active pods.
	var podsMu sync.Mutex
	var active []*v1.Pod
	pods := func() []*v1.Pod {
		podsMu.Lock()
		defer podsMu.Unlock()
		return slices.Clone(active)
	}
	setActive := func(p ...*v1.Pod) {
		podsMu.Lock()
		defer podsMu.Unlock()
		active = p
	}
	m := deviceManager(t, logger, n.path("device-plugins"), pods)
	var k *draKubelet
	awaitKubeletWipe(t, ctx, a.admin, nodeName, func() {
		k = startDRAKubelet(t, ctx, logger, n, a.admin, nodeGetter(a.admin, nodeName, nil), pods)
	})
	seen := startScheduler(t, ctx, a.admin)
	// The ServiceAccount admission wants the namespace's default account,
	// which the controller manager (not run here) would create.
	_, err := a.admin.CoreV1().ServiceAccounts("default").Create(ctx, &v1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("the default ServiceAccount: %v", err)
	}

	// admit is the kubelet's part for a bound pod's container: admission
	// (device manager Allocate; DRA PrepareResources), then what its
	// container manager hands the runtime.
	admit := func(pod *v1.Pod) (*devicemanager.DeviceRunContainerOptions, []string) {
		t.Helper()
		container := &pod.Spec.Containers[0]
		if err := m.Allocate(ctx, pod, container, lifecycle.AddOperation); err != nil {
			t.Fatalf("%s: the kubelet's device manager Allocate: %v", pod.Name, err)
		}
		if err := k.manager.PrepareResources(ctx, pod); err != nil {
			t.Fatalf("%s: the kubelet's DRA PrepareResources: %v", pod.Name, err)
		}
		opts, err := m.GetDeviceRunContainerOptions(ctx, pod, container)
		if err != nil {
			t.Fatalf("%s: the kubelet's GetDeviceRunContainerOptions: %v", pod.Name, err)
		}
		info, names := claimNames(t, k.manager, pod)
		if opts == nil {
			opts = &devicemanager.DeviceRunContainerOptions{}
		}
		view := checkContainer(t, pod.Name+"'s container", n.path("cdi"), runOptions(info, opts), n.staticAnswer(ids)).View
		return opts, append(names, fmt.Sprint(view))
	}

	// Before: a device plugin.
	d := startDevhost(t, n, "devhost-device-plugin.log")
	eventually(t, wait, "the kubelet counts 1 healthy example.com/gpu device", func() (bool, string) {
		c, al := capacityOf(m, logger, gpu)
		return c == 1 && al == 1, fmt.Sprintf("capacity %d, allocatable %d", c, al)
	})
	if c, al := publishNodeStatus(t, ctx, a.admin, nodeName, m, logger, gpu); c != 1 || al != 1 {
		t.Fatalf("the Node lists example.com/gpu capacity %d, allocatable %d; want 1 and 1", c, al)
	}
	before := scheduled(t, ctx, a.admin, gpuPod("app-before"), nodeName, func(*v1.Pod) bool { return true })
	if before.Status.ExtendedResourceClaimStatus != nil {
		t.Errorf("before the move the scheduler gave the pod an extended-resource claim: %+v", before.Status.ExtendedResourceClaimStatus)
	}
	setActive(before)
	optsBefore, seenBefore := admit(before)
	if got := slices.Sorted(maps.Keys(m.GetDevices(string(before.UID), "main")[gpu])); !slices.Equal(got, ids) {
		t.Errorf("the device manager allocated %q to %s, want %q", got, before.Name, ids)
	}
	if want := gpu + "=gpu-0"; len(optsBefore.CDIDevices) != 1 || optsBefore.CDIDevices[0].Name != want {
		t.Errorf("before: the device manager's CDI devices %v, want %s", optsBefore.CDIDevices, want)
	}
	viewBefore := seenBefore[len(seenBefore)-1]

	// The pod is gone (its device freed) before the move.
	if err := a.admin.CoreV1().Pods("default").Delete(ctx, before.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	setActive()

	// The move: api = "dra" in the backend file, devhost restarted, the
	// DeviceClass devhost prints applied.
	t.Logf("devhost (device plugin) exited %v after SIGTERM", d.stop())
	n.staticBackend("gpus", gpu, ids, draResource)
	classes := applyDeviceClasses(t, ctx, a.admin, n.path("config", "backends.d"))
	if len(classes) != 1 || classes[0].Spec.ExtendedResourceName == nil || *classes[0].Spec.ExtendedResourceName != gpu {
		t.Fatalf("devhost deviceclass: %d classes, want one with extendedResourceName %s: %+v", len(classes), gpu, classes)
	}
	d2 := startDevhost(t, n, "devhost-dra.log")
	k.handler.waitRegistered(t, d2, driver)
	eventually(t, wait, "the API server holds the driver's slice with gpu-0", func() (bool, string) {
		names, note := publishedDevices(ctx, a.admin, nodeName, driver)
		return slices.Equal(names, ids), note
	})
	// The device plugin is gone: the kubelet keeps its resource in the
	// capacity (5 minutes' grace) with nothing allocatable, and says so
	// on the Node. That is what the scheduler sees during a real move.
	eventually(t, wait, "the kubelet's device manager sees the plugin gone (capacity 1, allocatable 0)", func() (bool, string) {
		c, al := capacityOf(m, logger, gpu)
		return c == 1 && al == 0, fmt.Sprintf("capacity %d, allocatable %d", c, al)
	})
	if c, al := publishNodeStatus(t, ctx, a.admin, nodeName, m, logger, gpu); c != 1 || al != 0 {
		t.Fatalf("the Node lists example.com/gpu capacity %d, allocatable %d; want 1 and 0", c, al)
	}

	schedulerSeesAllocatable(t, seen, nodeName, gpu, 1, 0)

	// After: the same pod spec.
	after := scheduled(t, ctx, a.admin, gpuPod("app-after"), nodeName, func(p *v1.Pod) bool {
		return p.Status.ExtendedResourceClaimStatus != nil
	})
	status := after.Status.ExtendedResourceClaimStatus
	if len(status.RequestMappings) != 1 || status.RequestMappings[0].ContainerName != "main" || status.RequestMappings[0].ResourceName != gpu {
		t.Errorf("the pod's extendedResourceClaimStatus maps %+v, want container main's %s", status.RequestMappings, gpu)
	}
	claim, err := a.admin.ResourceV1().ResourceClaims("default").Get(ctx, status.ResourceClaimName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the scheduler's extended-resource claim %s: %v", status.ResourceClaimName, err)
	}
	// Gone with the test, as the controller manager's resourceclaim
	// controller (not run here) removes it once its pod is gone: a claim
	// left reserved would hold gpu-0 against the next run.
	t.Cleanup(func() {
		bg := context.Background()
		if c, err := a.admin.ResourceV1().ResourceClaims("default").Get(bg, claim.Name, metav1.GetOptions{}); err == nil && len(c.Finalizers) != 0 {
			c.Finalizers = nil
			_, _ = a.admin.ResourceV1().ResourceClaims("default").Update(bg, c, metav1.UpdateOptions{})
		}
		_ = a.admin.ResourceV1().ResourceClaims("default").Delete(bg, claim.Name, metav1.DeleteOptions{})
	})
	if claim.Annotations[resourceapi.ExtendedResourceClaimAnnotation] != "true" {
		t.Errorf("claim %s lacks the %s annotation: %v", claim.Name, resourceapi.ExtendedResourceClaimAnnotation, claim.Annotations)
	}
	if claim.Status.Allocation == nil {
		t.Fatalf("the scheduler bound %s but its claim %s is not allocated", after.Name, claim.Name)
	}
	var allocated []string
	for _, r := range claim.Status.Allocation.Devices.Results {
		allocated = append(allocated, r.Driver+"/"+r.Pool+"/"+r.Device)
	}
	if want := []string{driver + "/" + nodeName + "/gpu-0"}; !slices.Equal(allocated, want) {
		t.Errorf("the scheduler allocated %q, want %q", allocated, want)
	}
	if len(claim.Status.ReservedFor) != 1 || claim.Status.ReservedFor[0].UID != after.UID {
		t.Errorf("claim %s is reserved for %+v, want pod %s", claim.Name, claim.Status.ReservedFor, after.Name)
	}
	setActive(after)
	optsAfter, seenAfter := admit(after)
	// The device manager leaves the DRA-backed resource alone (it still
	// knows the resource from the gone plugin, so it would otherwise try
	// to allocate it and refuse the pod).
	if got := m.GetDevices(string(after.UID), "main"); len(got) != 0 {
		t.Errorf("after: the device manager allocated %v too", got)
	}
	if len(optsAfter.CDIDevices) != 0 || len(optsAfter.Envs) != 0 || len(optsAfter.Devices) != 0 || len(optsAfter.Mounts) != 0 {
		t.Errorf("after: the device manager hands the runtime %+v, want nothing", optsAfter)
	}
	namesAfter := seenAfter[:len(seenAfter)-1]
	if want := "k8s." + driver + "/claim=" + string(claim.UID) + "-"; len(namesAfter) != 1 || !strings.HasPrefix(namesAfter[0], want) {
		t.Errorf("after: the DRA manager's CDI devices %q, want the claim's own (%s<request>)", namesAfter, want)
	}
	viewAfter := seenAfter[len(seenAfter)-1]
	if viewBefore != viewAfter {
		t.Errorf("the same pod spec's container differs across the move:\n  before (device plugin): %s\n  after (DRA):            %s", viewBefore, viewAfter)
	}
	t.Logf("the container before and after the move: %s", viewAfter)

	setActive()
	if err := k.manager.UnprepareResources(ctx, after); err != nil {
		t.Errorf("the kubelet's UnprepareResources: %v", err)
	}
}
