package realpeers

// Device status (ResourceClaim.status.devices) written by devhost to the
// real kube-apiserver, with nothing but the rights deploy/kubernetes/rbac.yaml
// grants: `update` on resourceclaims/status and `associated-node:update`
// on resourceclaims/driver. Since 1.36 (DRAResourceClaimGranularStatusAuthorization)
// the API server grants associated-node only when the caller's token is
// bound to a pod on the node the claim is allocated on, and that node is
// named by the allocation's node selector exactly (metadata.name In [node],
// what the scheduler writes for a node-local device); otherwise the write
// needs arbitrary-node, which devhost is not given.

import (
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestDeviceStatusReachesTheRealAPIServerWithTheShippedRBAC(t *testing.T) {
	a := realAPIServer(t)
	ctx, logger := testContext(t, 4*time.Minute)
	const nodeName = "node-status"
	a.node(t, ctx, nodeName)
	n := newNode(t)

	// devhost's own pod, on the node, as its DaemonSet would run it; the
	// token devhost uses is bound to it.
	self, err := a.admin.CoreV1().Pods("devhost").Create(ctx, &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "devhost-" + nodeName},
		Spec: v1.PodSpec{
			NodeName:           nodeName,
			ServiceAccountName: "devhost",
			Containers:         []v1.Container{{Name: "devhost", Image: "devhost:test"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("devhost's pod: %v", err)
	}
	kubeconfig := a.devhostKubeconfigBoundTo(t, ctx, n, self)

	// gpu-1 is a NIC with an interface, an address and IPs.
	network := `network = { interface_name = "eth1", hardware_address = "02:00:00:00:00:05", ips = ["10.0.0.5/24", "2001:db8::5/64"] }` + "\n"
	n.staticBackendNamed("gpus", gpu, "", []string{"gpu-0", "gpu-1"}, network+draResource)
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))

	var active runningPods
	var k *draKubelet
	awaitKubeletWipe(t, ctx, a.admin, nodeName, func() {
		k = startDRAKubelet(t, ctx, logger, n, a.admin, nodeGetter(a.admin, nodeName, nil), active.list)
	})
	d := startDevhost(t, n, "devhost.log")
	k.handler.waitRegistered(t, d, driver)
	eventually(t, wait, "the real API server holds the driver's slices", func() (bool, string) {
		names, note := publishedDevices(ctx, a.admin, nodeName, driver)
		return slices.Equal(names, []string{"gpu-0", "gpu-1"}), note
	})

	// A claim allocated on this node as the scheduler allocates it: the
	// status write is allowed as associated-node.
	claim, pod := claimFor(t, ctx, a.admin, nodeName, "claim-nic", "gpu-1")
	active.set(pod)
	if err := k.manager.PrepareResources(ctx, pod); err != nil {
		t.Fatalf("the kubelet's PrepareResources: %v\n%s", err, d.logTail(20))
	}
	stored, err := a.admin.ResourceV1().ResourceClaims("default").Get(ctx, claim.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(stored.Status.Devices) != 1 {
		t.Fatalf("status.devices %+v, want gpu-1's entry\n%s", stored.Status.Devices, d.logTail(20))
	}
	entry := stored.Status.Devices[0]
	if entry.Driver != driver || entry.Pool != nodeName || entry.Device != "gpu-1" || entry.ShareID != nil {
		t.Errorf("entry for %s/%s/%s (share %v), want %s/%s/gpu-1", entry.Driver, entry.Pool, entry.Device, entry.ShareID, driver, nodeName)
	}
	wantNetwork := resourceapi.NetworkDeviceData{InterfaceName: "eth1", HardwareAddress: "02:00:00:00:00:05", IPs: []string{"10.0.0.5/24", "2001:db8::5/64"}}
	if got := entry.NetworkData; got == nil || got.InterfaceName != wantNetwork.InterfaceName ||
		got.HardwareAddress != wantNetwork.HardwareAddress || !slices.Equal(got.IPs, wantNetwork.IPs) {
		t.Errorf("networkData %+v, want %+v", got, wantNetwork)
	}
	// The allocation and the reservation are as they were.
	if !slices.Equal(resultDevices(stored), []string{"gpu-1"}) || len(stored.Status.ReservedFor) != 1 {
		t.Errorf("the status write changed the allocation or the reservation: %+v", stored.Status)
	}

	// The pod is gone: unprepared (the status stays; whoever deallocates
	// the claim clears it), and gpu-1 is free for the next claim.
	active.set()
	if err := k.manager.UnprepareResources(ctx, pod); err != nil {
		t.Fatalf("the kubelet's UnprepareResources: %v", err)
	}

	// A claim whose node selector names the node by its label instead:
	// the API server cannot tie it to the token's node, so the write needs
	// arbitrary-node, which devhost does not have. The claim is prepared
	// but answered with the API server's refusal, and nothing is written.
	byLabel := &v1.NodeSelector{NodeSelectorTerms: []v1.NodeSelectorTerm{{
		MatchExpressions: []v1.NodeSelectorRequirement{{Key: "kubernetes.io/hostname", Operator: v1.NodeSelectorOpIn, Values: []string{nodeName}}},
	}}}
	claim2, pod2 := claimSelecting(t, ctx, a.admin, nodeName, byLabel, "claim-nic-by-label", "gpu-1")
	active.set(pod2)
	err = k.manager.PrepareResources(ctx, pod2)
	if err == nil {
		t.Fatalf("PrepareResources of a claim whose status devhost may not write succeeded")
	}
	t.Logf("the refusal, as the kubelet hears it: %v", err)
	for _, want := range []string{"cannot write the ResourceClaim's status", "422 Unprocessable Entity", `cannot arbitrary-node:update resource \"resourceclaims/driver\"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("PrepareResources: %v\nwant it to say %q", err, want)
		}
	}
	stored2, err := a.admin.ResourceV1().ResourceClaims("default").Get(ctx, claim2.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(stored2.Status.Devices) != 0 {
		t.Errorf("status.devices %+v written without the right to", stored2.Status.Devices)
	}
}

// resultDevices is the devices of claim's allocation, in order.
func resultDevices(claim *resourceapi.ResourceClaim) []string {
	var devices []string
	if claim.Status.Allocation != nil {
		for _, r := range claim.Status.Allocation.Devices.Results {
			devices = append(devices, r.Device)
		}
	}
	return devices
}
