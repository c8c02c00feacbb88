// Command helper-driver is a DRA driver built on upstream's kubelet plugin
// helper (k8s.io/dynamic-resource-allocation/kubeletplugin), serving the
// kind of device devhost's static backend serves: one node, N devices
// gpu-0 … gpu-<N-1>, published as one ResourceSlice through the helper.
// It is the anchor of the DRA prepare benchmark (dra_bench_test.go): it
// does the work a driver written the upstream way does for a claim, so
// devhost's figures have something to be held against.
//
//	helper-driver --driver NAME --node NODE --kubeconfig FILE \
//	    --kubelet-root DIR --cdi-dir DIR --state-dir DIR [--devices N]
//
// Preparing a claim (the helper has read it from the API server, checked
// its UID and that it is allocated): for each of this driver's devices in
// the allocation, refuse a device another prepared claim holds; write one
// CDI spec per claim (its UID in the file name, one CDI device per
// request, with what devhost's static backend gives: a variable naming the
// devices, each device's node and a mount of its own) with the CDI
// library's Cache.WriteSpec, as the upstream example driver does; record
// the batch's new claims in a checkpoint written once per batch with the
// kubelet's checkpointmanager (written beside, fsync'd, renamed), before
// the answer. A claim already prepared is answered from memory.
// Unpreparing removes the spec and the checkpoint entry (one write per
// batch). The checkpoint is read at start, so a restarted driver knows
// what it prepared.
//
// It prints "ready" on stdout once its sockets are served and its slice
// is handed to the helper's publisher; it stops on SIGTERM.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/checkpointmanager"
	"k8s.io/kubernetes/pkg/kubelet/checkpointmanager/checksum"
	cperrors "k8s.io/kubernetes/pkg/kubelet/checkpointmanager/errors"
	"k8s.io/utils/ptr"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

// checkpointKey is the checkpoint's file name in --state-dir.
const checkpointKey = "checkpoint.json"

// preparedDevice is one device prepared for a claim, as the kubelet was
// answered.
type preparedDevice struct {
	Request string   `json:"request"`
	Pool    string   `json:"pool"`
	Device  string   `json:"device"`
	CDIIDs  []string `json:"cdiIDs"`
}

// preparedClaims is the checkpoint's content: claim UID → devices.
type preparedClaims map[types.UID][]preparedDevice

// checkpoint is what the kubelet's checkpointmanager stores: the claims
// and a checksum of them.
type checkpoint struct {
	Claims   preparedClaims    `json:"claims"`
	Checksum checksum.Checksum `json:"checksum"`
}

func (c *checkpoint) MarshalCheckpoint() ([]byte, error) {
	c.Checksum = 0
	c.Checksum = checksum.New(c)
	return json.Marshal(c)
}

func (c *checkpoint) UnmarshalCheckpoint(blob []byte) error { return json.Unmarshal(blob, c) }

func (c *checkpoint) VerifyChecksum() error {
	sum := c.Checksum
	c.Checksum = 0
	err := sum.Verify(c)
	c.Checksum = sum
	return err
}

// driver implements kubeletplugin.DRAPlugin.
type driver struct {
	name, node, dataDir string
	cdi                 *cdiapi.Cache
	checkpoints         checkpointmanager.CheckpointManager

	// The helper serializes prepares and unprepares (its default); the
	// mutex keeps the driver correct without relying on that.
	mu       sync.Mutex
	prepared preparedClaims
}

func (d *driver) cdiKind() string { return "k8s." + d.name + "/claim" }

func (d *driver) specName(uid types.UID) string {
	// <vendor>_<class>-<uid>.json: the claim's UID in the name, as
	// upstream's example driver names its specs.
	return strings.ReplaceAll(d.cdiKind(), "/", "_") + "-" + string(uid) + ".json"
}

func (d *driver) save() error {
	return d.checkpoints.CreateCheckpoint(checkpointKey, &checkpoint{Claims: d.prepared})
}

// holder is the prepared claim other than uid that holds device.
func (d *driver) holder(uid types.UID, device string) (types.UID, bool) {
	for other, devices := range d.prepared {
		if other == uid {
			continue
		}
		for _, dev := range devices {
			if dev.Device == device {
				return other, true
			}
		}
	}
	return "", false
}

// prepareOne writes the claim's CDI spec and records it (not yet saved).
func (d *driver) prepareOne(claim *resourceapi.ResourceClaim) ([]preparedDevice, error) {
	byRequest := map[string][]string{}
	var order []string
	for _, result := range claim.Status.Allocation.Devices.Results {
		if result.Driver != d.name {
			continue
		}
		if result.Pool != d.node {
			return nil, fmt.Errorf("device %s is from pool %s, not this node's", result.Device, result.Pool)
		}
		if other, held := d.holder(claim.UID, result.Device); held {
			return nil, fmt.Errorf("device %s is prepared for claim %s", result.Device, other)
		}
		if _, seen := byRequest[result.Request]; !seen {
			order = append(order, result.Request)
		}
		byRequest[result.Request] = append(byRequest[result.Request], result.Device)
	}
	if len(order) == 0 {
		return nil, errors.New("no device of this driver is allocated to the claim")
	}
	spec := &cdispec.Spec{Version: "0.6.0", Kind: d.cdiKind()}
	var devices []preparedDevice
	for _, request := range order {
		names := byRequest[request]
		edits := cdispec.ContainerEdits{Env: []string{"DEVHOST_IDS=" + strings.Join(names, ",")}}
		for i, name := range names {
			edits.DeviceNodes = append(edits.DeviceNodes, &cdispec.DeviceNode{Path: "/dev/" + name, HostPath: "/dev/null", Permissions: "rw"})
			options := []string{"rbind", "rw"}
			if i%2 == 0 {
				options = []string{"rbind", "ro"}
			}
			edits.Mounts = append(edits.Mounts, &cdispec.Mount{HostPath: filepath.Join(d.dataDir, name), ContainerPath: "/data/" + name, Options: options})
		}
		cdiName := string(claim.UID) + "-" + request
		spec.Devices = append(spec.Devices, cdispec.Device{Name: cdiName, ContainerEdits: edits})
		for _, name := range names {
			devices = append(devices, preparedDevice{Request: request, Pool: d.node, Device: name, CDIIDs: []string{d.cdiKind() + "=" + cdiName}})
		}
	}
	if err := d.cdi.WriteSpec(spec, d.specName(claim.UID)); err != nil {
		return nil, fmt.Errorf("write CDI spec: %w", err)
	}
	d.prepared[claim.UID] = devices
	return devices, nil
}

func answer(devices []preparedDevice) kubeletplugin.PrepareResult {
	var result kubeletplugin.PrepareResult
	for _, dev := range devices {
		result.Devices = append(result.Devices, kubeletplugin.Device{
			Requests: []string{dev.Request}, PoolName: dev.Pool, DeviceName: dev.Device, CDIDeviceIDs: dev.CDIIDs,
		})
	}
	return result
}

func (d *driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	results := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	var fresh []types.UID
	for _, claim := range claims {
		if devices, ok := d.prepared[claim.UID]; ok {
			results[claim.UID] = answer(devices)
			continue
		}
		devices, err := d.prepareOne(claim)
		if err != nil {
			results[claim.UID] = kubeletplugin.PrepareResult{Err: err}
			continue
		}
		fresh = append(fresh, claim.UID)
		results[claim.UID] = answer(devices)
	}
	if len(fresh) > 0 {
		if err := d.save(); err != nil {
			// Unrecorded claims must not stay prepared.
			for _, uid := range fresh {
				delete(d.prepared, uid)
				_ = d.cdi.RemoveSpec(d.specName(uid))
				results[uid] = kubeletplugin.PrepareResult{Err: fmt.Errorf("checkpoint: %w", err)}
			}
		}
	}
	return results, nil
}

func (d *driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	results := make(map[types.UID]error, len(claims))
	removed := map[types.UID][]preparedDevice{}
	for _, claim := range claims {
		results[claim.UID] = nil
		devices, ok := d.prepared[claim.UID]
		if !ok {
			continue
		}
		if err := d.cdi.RemoveSpec(d.specName(claim.UID)); err != nil {
			results[claim.UID] = fmt.Errorf("remove CDI spec: %w", err)
			continue
		}
		removed[claim.UID] = devices
		delete(d.prepared, claim.UID)
	}
	if len(removed) > 0 {
		if err := d.save(); err != nil {
			for uid, devices := range removed {
				d.prepared[uid] = devices
				results[uid] = fmt.Errorf("checkpoint: %w", err)
			}
		}
	}
	return results, nil
}

func (d *driver) HandleError(ctx context.Context, err error, msg string) {
	klog.FromContext(ctx).Error(err, msg)
}

func (d *driver) WatchHealthStatus(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}

func main() {
	name := flag.String("driver", "helper.example.com", "the DRA driver name")
	node := flag.String("node", "", "the node name (also the pool name)")
	kubeconfig := flag.String("kubeconfig", "", "the kubeconfig to reach the API server")
	root := flag.String("kubelet-root", "", "the kubelet's root directory (plugins_registry/, plugins/)")
	cdiDir := flag.String("cdi-dir", "", "where the claims' CDI specs go")
	stateDir := flag.String("state-dir", "", "where the checkpoint goes")
	dataDir := flag.String("data-dir", "/tmp", "the directory each device's mount comes from (<dir>/<device>)")
	count := flag.Int("devices", 8, "the number of devices gpu-0 … gpu-<N-1>")
	flag.Parse()
	if err := run(*name, *node, *kubeconfig, *root, *cdiDir, *stateDir, *dataDir, *count); err != nil {
		fmt.Fprintf(os.Stderr, "helper-driver: %v\n", err)
		os.Exit(1)
	}
}

func run(name, node, kubeconfig, root, cdiDir, stateDir, dataDir string, count int) error {
	if node == "" || kubeconfig == "" || root == "" || cdiDir == "" || stateDir == "" {
		return errors.New("--node, --kubeconfig, --kubelet-root, --cdi-dir and --state-dir are required")
	}
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	config.QPS, config.Burst = 100, 200
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	checkpoints, err := checkpointmanager.NewCheckpointManager(stateDir)
	if err != nil {
		return fmt.Errorf("checkpoint directory: %w", err)
	}
	loaded := &checkpoint{Claims: preparedClaims{}}
	if err := checkpoints.GetCheckpoint(checkpointKey, loaded); err != nil && !errors.Is(err, cperrors.ErrCheckpointNotFound) {
		return fmt.Errorf("read checkpoint: %w", err)
	}
	if loaded.Claims == nil {
		loaded.Claims = preparedClaims{}
	}
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(cdiDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return fmt.Errorf("CDI cache: %w", err)
	}
	d := &driver{name: name, node: node, dataDir: dataDir, cdi: cache, checkpoints: checkpoints, prepared: loaded.Claims}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	pluginDir := filepath.Join(root, "plugins", name)
	if err := os.MkdirAll(pluginDir, 0o755); err != nil {
		return err
	}
	helper, err := kubeletplugin.Start(ctx, d,
		kubeletplugin.DriverName(name),
		kubeletplugin.NodeName(node),
		kubeletplugin.KubeClient(client),
		kubeletplugin.RegistrarDirectoryPath(filepath.Join(root, "plugins_registry")),
		kubeletplugin.PluginDataDirectoryPath(pluginDir),
	)
	if err != nil {
		return fmt.Errorf("start the kubelet plugin helper: %w", err)
	}
	defer helper.Stop()
	var devices []resourceapi.Device
	for i := range count {
		devices = append(devices, resourceapi.Device{
			Name: fmt.Sprintf("gpu-%d", i),
			Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
				"example.com/model": {StringValue: ptr.To("peer-test")},
				"example.com/index": {IntValue: ptr.To(int64(i))},
			},
		})
	}
	resources := resourceslice.DriverResources{Pools: map[string]resourceslice.Pool{
		node: {Slices: []resourceslice.Slice{{Devices: devices}}},
	}}
	if err := helper.PublishResources(ctx, resources); err != nil {
		return fmt.Errorf("publish the ResourceSlice: %w", err)
	}
	fmt.Println("ready")
	<-ctx.Done()
	return nil
}
