// Package realpeers runs devhost against the real Kubernetes components'
// own code (the kubelet's device manager, plugin watcher and DRA manager, a
// real kube-apiserver and etcd), in process. Everything is in the _test.go
// files except this one declaration, which cannot live there.
package realpeers

import (
	_ "unsafe" // for go:linkname

	cadvisorapi "github.com/google/cadvisor/lib/model"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

// newDeviceManager is the kubelet's own constructor of its device manager,
// devicemanager.newManagerImpl, with the registration socket's path as a
// parameter. The exported NewManagerImpl hard-codes
// /var/lib/kubelet/device-plugins/kubelet.sock; this is the function it
// calls with that path (and the one the kubelet's own unit tests use), so
// the manager under test is exactly the kubelet's, in a temporary
// directory. The signature is that of k8s.io/kubernetes v1.37.2 (go.mod);
// TestDeviceManagerConstructorSignature guards it after an upgrade.
//
//go:linkname newDeviceManager k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newDeviceManager(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)
