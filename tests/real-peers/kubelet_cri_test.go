package realpeers

// The move from device plugin to DRA (issue 28) with the whole real
// kubelet: the same pod spec, asking for example.com/gpu in
// resources.limits, bound by the real scheduler and started by the real
// kubelet (cmd/kubelet, v1.37.2) behind the kubelet's own fake CRI, before
// and after devhost's backend file switches to api = "dra". What the
// kubelet asks the runtime for in CreateContainer, built as containerd 2.2
// builds the container, must give it the backend's device both times.

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	kubecontainer "k8s.io/kubernetes/pkg/kubelet/container"
)

// fromCRI is the container options of a CreateContainer request in the
// kubelet's terms (what cdi_check_test.go's runtime check reads): its
// envs (bytes in CRI 1.36+), device nodes, mounts, annotations and CDI
// names. Left out, and returned apart, is what the kubelet gives every
// container whatever devices it has: the API server Service's variables
// (KUBERNETES_*) and the mounts of files it keeps in the pod's directory
// under its root (/etc/hosts, the termination log, the service-account
// token).
func fromCRI(config *runtimeapi.ContainerConfig, kubeletRoot string) (*kubecontainer.RunContainerOptions, []string) {
	opts := &kubecontainer.RunContainerOptions{}
	var own []string
	podsDir := filepath.Join(kubeletRoot, "pods") + "/"
	for _, e := range config.Envs {
		if strings.HasPrefix(e.Key, "KUBERNETES_") {
			own = append(own, "env "+e.Key)
			continue
		}
		opts.Envs = append(opts.Envs, kubecontainer.EnvVar{Name: e.Key, Value: string(e.Value)})
	}
	for _, d := range config.Devices {
		opts.Devices = append(opts.Devices, kubecontainer.DeviceInfo{PathOnHost: d.HostPath, PathInContainer: d.ContainerPath, Permissions: d.Permissions})
	}
	for _, m := range config.Mounts {
		if strings.HasPrefix(m.HostPath, podsDir) {
			own = append(own, "mount "+m.ContainerPath)
			continue
		}
		opts.Mounts = append(opts.Mounts, kubecontainer.Mount{Name: m.ContainerPath, ContainerPath: m.ContainerPath, HostPath: m.HostPath, ReadOnly: m.Readonly})
	}
	for _, name := range slices.Sorted(maps.Keys(config.Annotations)) {
		opts.Annotations = append(opts.Annotations, kubecontainer.Annotation{Name: name, Value: config.Annotations[name]})
	}
	for _, c := range config.CDIDevices {
		opts.CDIDevices = append(opts.CDIDevices, kubecontainer.CDIDevice{Name: c.Name})
	}
	slices.Sort(own)
	return opts, own
}

// nodeReady waits until the kubelet has registered nodeName and reports
// it Ready, then lifts the taints the API server puts on a new Node, as
// the node lifecycle controller (not run here) does once it is Ready.
func nodeReady(t *testing.T, ctx context.Context, client kubernetes.Interface, nodeName string, k *realKubelet) {
	t.Helper()
	eventually(t, kubeletWait, "the kubelet registers Node "+nodeName+" and reports it Ready", func() (bool, string) {
		node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error() + k.exitNote()
		}
		for _, c := range node.Status.Conditions {
			if c.Type == v1.NodeReady {
				return c.Status == v1.ConditionTrue, fmt.Sprintf("Ready %s: %s %s%s", c.Status, c.Reason, c.Message, k.exitNote())
			}
		}
		return false, "no Ready condition yet" + k.exitNote()
	})
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(node.Spec.Taints) == 0 {
			return nil
		}
		node.Spec.Taints = nil
		_, err = client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		t.Fatalf("lift Node %s's taints: %v", nodeName, err)
	}
}

// nodeLists waits until the Node's status (as the kubelet writes it) says
// capacity and allocatable for resourceName.
func nodeLists(t *testing.T, ctx context.Context, client kubernetes.Interface, nodeName, resourceName string, capacity, allocatable int64, k *realKubelet) {
	t.Helper()
	eventually(t, kubeletWait, fmt.Sprintf("the kubelet's Node status lists %s capacity %d, allocatable %d", resourceName, capacity, allocatable), func() (bool, string) {
		node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		c, hasC := node.Status.Capacity[v1.ResourceName(resourceName)]
		a, hasA := node.Status.Allocatable[v1.ResourceName(resourceName)]
		return hasC && hasA && c.Value() == capacity && a.Value() == allocatable,
			fmt.Sprintf("capacity %v, allocatable %v%s", node.Status.Capacity, node.Status.Allocatable, k.exitNote())
	})
}

// containerCreated waits until the kubelet has created pod's container in
// the fake runtime and the pod is Running (the fake says it started);
// returns the CreateContainer request's config.
func containerCreated(t *testing.T, ctx context.Context, client kubernetes.Interface, cri *fakeCRI, k *realKubelet, pod *v1.Pod) *runtimeapi.ContainerConfig {
	t.Helper()
	var config *runtimeapi.ContainerConfig
	eventually(t, kubeletWait, "the kubelet creates "+pod.Name+"'s container in the runtime and the pod runs", func() (bool, string) {
		var note string
		if config == nil {
			config, note = cri.created(pod.Name)
		}
		got, err := client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		if config != nil && got.Status.Phase == v1.PodRunning {
			return true, ""
		}
		return false, fmt.Sprintf("%s; pod phase %s, conditions %+v, container statuses %+v; events %s; the kubelet on it:\n%s%s",
			note, got.Status.Phase, got.Status.Conditions, got.Status.ContainerStatuses, eventsFor(ctx, client, got), k.logLines(pod.Name, 10), k.exitNote())
	})
	return config
}

// podGone deletes pod (the default grace) and waits until the kubelet has
// stopped it and the API server has let it go.
func podGone(t *testing.T, ctx context.Context, client kubernetes.Interface, k *realKubelet, pod *v1.Pod) {
	t.Helper()
	if err := client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete pod %s: %v", pod.Name, err)
	}
	eventually(t, kubeletWait, "the kubelet stops pod "+pod.Name+" and it is gone", func() (bool, string) {
		got, err := client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, ""
		}
		if err != nil {
			return false, err.Error()
		}
		return false, fmt.Sprintf("phase %s, container statuses %+v; the kubelet on it:\n%s%s", got.Status.Phase, got.Status.ContainerStatuses, k.logLines(pod.Name, 10), k.exitNote())
	})
}

// The move from device plugin to DRA through the whole kubelet (issue 28).
// The real kubelet (cmd/kubelet v1.37.2, in its own mount namespace) runs
// behind the kubelet's fake CRI; the real scheduler binds; the real API
// server holds it all. Before: devhost serves example.com/gpu as a device
// plugin; the kubelet registers it and its Node lists it allocatable; the
// scheduler binds a pod with resources.limits {example.com/gpu: 1}; the
// kubelet's CreateContainer carries devhost's envs and CDI name. The move:
// the pod is deleted, the backend file gets api = "dra", devhost restarts,
// the DeviceClass `devhost deviceclass` prints is applied; the Node says
// capacity 1, allocatable 0 (the gone plugin's 5 minutes' grace). After:
// the same pod spec, bound with an extended-resource claim the scheduler
// allocated from devhost's slice, prepared by the kubelet's DRA manager
// through devhost; its CreateContainer carries the claim's CDI name. Each
// container, built from the CreateContainer request as containerd 2.2
// builds it (CDI injected from the node's CDI directory), is exactly the
// backend's answer for gpu-0, and the two are the same.
func TestMigrationThroughTheWholeKubeletBehindTheFakeCRI(t *testing.T) {
	requireNamespaces(t)
	kubeletBinary(t) // built before the clock of the test's context starts
	a := realAPIServer(t)
	ctx, _ := testContext(t, 5*time.Minute)
	const nodeName = "node-kubelet-cri"
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)
	ids := []string{"gpu-0"}
	n.staticBackend("gpus", gpu, ids, "[resources.\""+gpu+"\"]\ncdi = true\n")
	// As in TestMigrationFromDevicePluginToDRAKeepsTheContainersDevice:
	// with PreStartContainer the kubelet v1.37.2 refuses the DRA-backed
	// container during the gone plugin's grace (kubernetes#141426).
	noPreStart(n, "gpus")
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))

	// What the controller manager (not run here) gives a namespace: the
	// default ServiceAccount (for the ServiceAccount admission) and the
	// cluster's CA in kube-root-ca.crt (for the kubelet's projected
	// service-account volume).
	_, err := a.admin.CoreV1().ServiceAccounts("default").Create(ctx, &v1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("the default ServiceAccount: %v", err)
	}
	_, err = a.admin.CoreV1().ConfigMaps("default").Create(ctx, &v1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-root-ca.crt"},
		Data:       map[string]string{"ca.crt": string(a.caPEM)},
	}, metav1.CreateOptions{})
	switch {
	case err == nil:
		t.Cleanup(func() {
			_ = a.admin.CoreV1().ConfigMaps("default").Delete(context.Background(), "kube-root-ca.crt", metav1.DeleteOptions{})
		})
	case !apierrors.IsAlreadyExists(err):
		t.Fatalf("ConfigMap kube-root-ca.crt: %v", err)
	}
	// The shared API server is left without this node once the kubelet
	// and devhost are gone (cleanups run last-registered first): a Ready
	// Node with devhost's slice would take the next test's pods.
	t.Cleanup(func() {
		bg := context.Background()
		_ = a.admin.ResourceV1().ResourceSlices().DeleteCollection(bg, metav1.DeleteOptions{},
			metav1.ListOptions{FieldSelector: resourceapi.ResourceSliceSelectorNodeName + "=" + nodeName})
		_ = a.admin.CoreV1().Nodes().Delete(bg, nodeName, metav1.DeleteOptions{})
	})

	cri := startFakeCRI(t, n.path("cri.sock"))
	k := startRealKubelet(t, a, n, nodeName, cri)
	nodeReady(t, ctx, a.admin, nodeName, k)
	// devhost registers with the kubelet's device manager, whose start
	// empties the directory: once its kubelet.sock is there.
	eventually(t, kubeletWait, "the kubelet's device manager listens on device-plugins/kubelet.sock", func() (bool, string) {
		info, err := os.Stat(n.path("device-plugins", "kubelet.sock"))
		return err == nil && info.Mode()&os.ModeSocket != 0, fmt.Sprint(err) + k.exitNote()
	})
	seen := startScheduler(t, ctx, a.admin)

	// checked is what the container gets from a CreateContainer request,
	// checked against the backend's answer for gpu-0.
	checked := func(what string, config *runtimeapi.ContainerConfig) (containerView, []string) {
		t.Helper()
		opts, own := fromCRI(config, n.root)
		t.Logf("%s: the kubelet's own entries (left out): %q", what, own)
		view := checkContainer(t, what, n.path("cdi"), opts, n.staticAnswer(ids)).View
		// The backend's device itself, spelt out: a device node at
		// /dev/gpu-0 and gpu-0's mount.
		dev := n.devices["gpu-0"]
		for _, prefix := range []string{"device " + dev.node.ContainerPath + " c ", "mount " + dev.mount.ContainerPath + " <- " + dev.mount.HostPath + " "} {
			if !slices.ContainsFunc(view, func(line string) bool { return strings.HasPrefix(line, prefix) }) {
				t.Errorf("%s: the container has no %q…: %q", what, prefix, view)
			}
		}
		var names []string
		for _, c := range config.CDIDevices {
			names = append(names, c.Name)
		}
		return view, names
	}

	// Before: a device plugin.
	d := startDevhost(t, n, "devhost-device-plugin.log")
	nodeLists(t, ctx, a.admin, nodeName, gpu, 1, 1, k)
	before := scheduled(t, ctx, a.admin, gpuPod("app-before"), nodeName, func(*v1.Pod) bool { return true })
	if before.Status.ExtendedResourceClaimStatus != nil {
		t.Errorf("before the move the scheduler gave the pod an extended-resource claim: %+v", before.Status.ExtendedResourceClaimStatus)
	}
	viewBefore, namesBefore := checked("before (device plugin): app-before's CreateContainer", containerCreated(t, ctx, a.admin, cri, k, before))
	if want := []string{gpu + "=gpu-0"}; !slices.Equal(namesBefore, want) {
		t.Errorf("before: CreateContainer's CDI_devices %q, want %q (devhost's name through the device manager)", namesBefore, want)
	}
	podGone(t, ctx, a.admin, k, before)

	// The move.
	t.Logf("devhost (device plugin) exited %v after SIGTERM", d.stop())
	n.staticBackend("gpus", gpu, ids, draResource)
	classes := applyDeviceClasses(t, ctx, a.admin, n.path("config", "backends.d"))
	if len(classes) != 1 || classes[0].Spec.ExtendedResourceName == nil || *classes[0].Spec.ExtendedResourceName != gpu {
		t.Fatalf("devhost deviceclass: %d classes, want one with extendedResourceName %s: %+v", len(classes), gpu, classes)
	}
	d2 := startDevhost(t, n, "devhost-dra.log")
	// The kubelet has registered the driver (it says so to devhost by
	// NotifyRegistrationStatus) before the pod comes: a pod whose claim
	// the kubelet cannot prepare yet ("DRA driver … is not registered")
	// is retried by kubelet v1.37.2 only at its next resync, 60 to 90 s
	// later (that failure is no error of its SyncPod, so no back-off).
	series := fmt.Sprintf("devhost_dra_registered{driver=%q}", driver)
	eventually(t, kubeletWait, "the kubelet registers DRA driver "+driver+" ("+series+" 1)", func() (bool, string) {
		v := d2.metric(series)
		return v == "1", "value " + v + d2.exitNote() + k.exitNote()
	})
	eventually(t, kubeletWait, "the API server holds the driver's slice with gpu-0", func() (bool, string) {
		names, note := publishedDevices(ctx, a.admin, nodeName, driver)
		return slices.Equal(names, ids), note + d2.exitNote()
	})
	// What the scheduler sees during a real move: the gone plugin's
	// resource kept in the capacity with nothing allocatable.
	nodeLists(t, ctx, a.admin, nodeName, gpu, 1, 0, k)
	schedulerSeesAllocatable(t, seen, nodeName, gpu, 1, 0)

	// After: the same pod spec.
	after := scheduled(t, ctx, a.admin, gpuPod("app-after"), nodeName, func(p *v1.Pod) bool {
		return p.Status.ExtendedResourceClaimStatus != nil
	})
	claimName := after.Status.ExtendedResourceClaimStatus.ResourceClaimName
	// Gone with the test, as the controller manager's resourceclaim
	// controller (not run here) removes it once its pod is gone.
	t.Cleanup(func() {
		bg := context.Background()
		if c, err := a.admin.ResourceV1().ResourceClaims("default").Get(bg, claimName, metav1.GetOptions{}); err == nil && len(c.Finalizers) != 0 {
			c.Finalizers = nil
			_, _ = a.admin.ResourceV1().ResourceClaims("default").Update(bg, c, metav1.UpdateOptions{})
		}
		_ = a.admin.ResourceV1().ResourceClaims("default").Delete(bg, claimName, metav1.DeleteOptions{})
	})
	claim, err := a.admin.ResourceV1().ResourceClaims("default").Get(ctx, claimName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the scheduler's extended-resource claim %s: %v", claimName, err)
	}
	if claim.Annotations[resourceapi.ExtendedResourceClaimAnnotation] != "true" || claim.Status.Allocation == nil {
		t.Fatalf("claim %s: annotations %v, allocation %+v; want the scheduler's extended-resource claim, allocated", claim.Name, claim.Annotations, claim.Status.Allocation)
	}
	var allocated []string
	for _, r := range claim.Status.Allocation.Devices.Results {
		allocated = append(allocated, r.Driver+"/"+r.Pool+"/"+r.Device)
	}
	if want := []string{driver + "/" + nodeName + "/gpu-0"}; !slices.Equal(allocated, want) {
		t.Errorf("the scheduler allocated %q, want %q", allocated, want)
	}
	viewAfter, namesAfter := checked("after (DRA): app-after's CreateContainer", containerCreated(t, ctx, a.admin, cri, k, after))
	if want := "k8s." + driver + "/claim=" + string(claim.UID) + "-"; len(namesAfter) == 0 || !strings.HasPrefix(namesAfter[0], want) {
		t.Errorf("after: CreateContainer's CDI_devices %q, want the claim's own (%s<request>) from the DRA manager", namesAfter, want)
	}
	if slices.Contains(namesAfter, gpu+"=gpu-0") {
		t.Errorf("after: CreateContainer's CDI_devices %q still carry the device plugin's name", namesAfter)
	}
	if !slices.Equal(viewBefore, viewAfter) {
		t.Errorf("the same pod spec's container differs across the move:\n  before (device plugin): %q\n  after (DRA):            %q", viewBefore, viewAfter)
	}
	t.Logf("the container before and after the move: %q", viewAfter)
	podGone(t, ctx, a.admin, k, after)
}
