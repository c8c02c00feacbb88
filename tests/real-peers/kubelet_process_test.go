package realpeers

// The whole kubelet (k8s.io/kubernetes/cmd/kubelet, the go.mod's release,
// built by the go command as a module tool) as a child process in a mount
// namespace of its own, behind the kubelet's own fake container runtime
// (k8s.io/cri-client/pkg/fake over k8s.io/cri-api/pkg/apis/testing's fake
// services) served from this process on a Unix socket, with every
// CreateContainer request recorded.

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-client/pkg/fake"
)

// kubeletWait bounds what the whole kubelet must do: register its Node,
// report a device plugin's resource, start a pod, finish one (it works on
// 1 to 10 s loops; generous for small CI machines).
const kubeletWait = 60 * time.Second

// fakeImageSize is what the fake image service reports as every image's
// size: the kubelet refuses an image of size 0 ("Id or size of image …
// is not set").
const fakeImageSize = 1 << 20

// createRequest is one CreateContainer call the kubelet made.
type createRequest struct {
	// Pod is the name of the pod whose sandbox the container goes in.
	Pod    string
	Config *runtimeapi.ContainerConfig
	Err    error
}

// fakeCRI is the kubelet's own fake runtime and image service, served on
// a Unix socket; it records each CreateContainer request.
type fakeCRI struct {
	endpoint string
	runtime  *fake.RemoteRuntime

	mu      sync.Mutex
	creates []createRequest
}

// startFakeCRI serves the fake runtime on socket until the test ends.
func startFakeCRI(t *testing.T, socket string) *fakeCRI {
	t.Helper()
	f := &fakeCRI{endpoint: "unix://" + socket, runtime: fake.NewFakeRemoteRuntime()}
	// RemoteRuntime.Start would serve on its own gRPC server, which takes
	// no interceptor: serve the same services on one that records.
	f.runtime.RuntimeService.FakeStatus = &runtimeapi.RuntimeStatus{Conditions: []*runtimeapi.RuntimeCondition{
		{Type: runtimeapi.RuntimeReady, Status: true},
		{Type: runtimeapi.NetworkReady, Status: true},
	}}
	f.runtime.ImageService.SetFakeImageSize(fakeImageSize)
	server := grpc.NewServer(grpc.UnaryInterceptor(f.record))
	runtimeapi.RegisterRuntimeServiceServer(server, f.runtime)
	runtimeapi.RegisterImageServiceServer(server, f.runtime)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatalf("the fake CRI's socket %s: %v", socket, err)
	}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return f
}

func (f *fakeCRI) record(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if create, ok := req.(*runtimeapi.CreateContainerRequest); ok {
		if created, ok := resp.(*runtimeapi.CreateContainerResponse); ok && err == nil {
			f.setLogPath(created.GetContainerId(), create)
		}
		f.mu.Lock()
		f.creates = append(f.creates, createRequest{
			Pod:    create.GetSandboxConfig().GetMetadata().GetName(),
			Config: proto.Clone(create.GetConfig()).(*runtimeapi.ContainerConfig),
			Err:    err,
		})
		f.mu.Unlock()
	}
	return resp, err
}

// setLogPath gives a created container the log path a real runtime
// reports in its status: the sandbox's log directory joined with the
// container's relative log path (containerd's CRI plugin does so). The
// fake leaves it empty, and when the kubelet removes a container it
// deletes what the glob "<status log path>*" matches: with an empty path,
// the files of its working directory.
func (f *fakeCRI) setLogPath(id string, req *runtimeapi.CreateContainerRequest) {
	path := filepath.Join(req.GetSandboxConfig().GetLogDirectory(), req.GetConfig().GetLogPath())
	if !filepath.IsAbs(path) {
		return
	}
	service := f.runtime.RuntimeService
	service.Lock()
	defer service.Unlock()
	if c, ok := service.Containers[id]; ok {
		c.LogPath = path
	}
}

// created is the first successful CreateContainer request for a container
// of pod, and a note on every call so far.
func (f *fakeCRI) created(pod string) (*runtimeapi.ContainerConfig, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var calls []string
	for _, c := range f.creates {
		if c.Pod == pod && c.Err == nil {
			return c.Config, ""
		}
		calls = append(calls, fmt.Sprintf("%s/%s: %v", c.Pod, c.Config.GetMetadata().GetName(), c.Err))
	}
	return nil, fmt.Sprintf("CreateContainer calls so far: %q; runtime calls: %d", calls, len(f.runtime.RuntimeService.GetCalls()))
}

// requireNamespaces skips the test unless this process may make a private
// mount namespace with a tmpfs, an overlay of /var and a bind mount in it,
// as the kubelet's needs (it writes under /var and hard-codes
// /var/lib/kubelet/device-plugins/kubelet.sock).
func requireNamespaces(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the whole kubelet needs root (mounts in a private mount namespace, a node's cgroups); run as root, as CI does")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skipf("the whole kubelet runs under unshare(1) (util-linux), which is not on PATH: %v", err)
	}
	dir, err := os.MkdirTemp("", "devhost-peers-probe-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", namespaceSetup+"true",
		"sh", dir, dir).CombinedOutput()
	if err != nil {
		t.Skipf("cannot make the kubelet's private mount namespace here (unshare --mount, tmpfs, overlay on /var, bind): %v\n%s", err, out)
	}
}

// namespaceSetup is the shell run in the kubelet's new mount namespace
// (propagation private: nothing reaches the host's, and all of it goes
// with the namespace's last process) before the kubelet itself: a tmpfs
// on $1 holding an overlay's upper layer for /var (what the kubelet writes
// there stays there), and $2 bound onto /var/lib/kubelet/device-plugins.
const namespaceSetup = `set -e
mount -t tmpfs devhost-peers-var "$1"
mkdir "$1/upper" "$1/work"
mount -t overlay devhost-peers-var -o "lowerdir=/var,upperdir=$1/upper,workdir=$1/work" /var
mkdir -p /var/lib/kubelet/device-plugins
mount --bind "$2" /var/lib/kubelet/device-plugins
shift 2
`

var (
	kubeletBuildOnce sync.Once
	kubeletPath      string
	kubeletBuildErr  error
)

// kubeletBinary is the kubelet of go.mod's k8s.io/kubernetes, built by
// `go tool -n kubelet` (go.mod declares it a tool): the go command builds
// it once and keeps the executable in its build cache.
func kubeletBinary(t *testing.T) string {
	t.Helper()
	kubeletBuildOnce.Do(func() {
		goCmd, err := exec.LookPath("go")
		if err != nil {
			goCmd = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		started := time.Now()
		cmd := exec.Command(goCmd, "tool", "-n", "kubelet")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			kubeletBuildErr = fmt.Errorf("%s tool -n kubelet: %v\n%s", goCmd, err, stderr.String())
			return
		}
		kubeletPath = strings.TrimSpace(string(out))
		t.Logf("the kubelet (go tool -n kubelet) at %s in %v", kubeletPath, time.Since(started).Round(time.Millisecond))
	})
	if kubeletBuildErr != nil {
		t.Fatalf("build the kubelet: %v", kubeletBuildErr)
	}
	return kubeletPath
}

// realKubelet is the whole kubelet as a child process.
type realKubelet struct {
	t       *testing.T
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
}

// startRealKubelet runs the kubelet for node nodeName with n's directory
// as its root (--root-dir: plugins_registry/, plugins/, pod-resources/
// and pods/ there; its device-plugins/ bound onto the path the kubelet
// hard-codes), against the API server as an admin, and cri as its runtime.
// Stopped (SIGTERM, then SIGKILL) when the test ends; its log shown if the
// test failed. Every mount it makes lives and dies with its namespace.
func startRealKubelet(t *testing.T, a *apiServer, n *node, nodeName string, cri *fakeCRI) *realKubelet {
	t.Helper()
	bin := kubeletBinary(t)
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	healthzPort, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"kubelet-scratch", "kubelet-cwd", "pod-logs", "pki"} {
		if err := os.MkdirAll(n.path(dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Must outlive the kubelet (see setLogPath).
	sentinel := n.write("kubelet-cwd/sentinel", "the kubelet's working directory\n")
	config := n.write("kubelet.yaml", fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
resolvConf: ""
podLogsDir: %q
nodeStatusUpdateFrequency: 2s
`, port, healthzPort, n.path("pod-logs")))
	kubeconfig := n.write("kubelet.kubeconfig", fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: peers
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: kubelet
  user:
    token: %s
contexts:
- name: kubelet
  context:
    cluster: peers
    user: kubelet
current-context: kubelet
`, a.url, base64.StdEncoding.EncodeToString(a.caPEM), adminToken))
	logName := "kubelet.log"
	logPath := n.path(logName)
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	args := []string{"--mount", "--propagation", "private", "sh", "-c", namespaceSetup + `exec "$@"`, "sh",
		n.path("kubelet-scratch"), n.path("device-plugins"),
		bin,
		"--config=" + config,
		"--root-dir=" + n.root,
		"--cert-dir=" + n.path("pki"),
		"--hostname-override=" + nodeName,
		"--kubeconfig=" + kubeconfig,
		"--container-runtime-endpoint=" + cri.endpoint,
		"--v=2",
	}
	cmd := exec.Command("unshare", args...)
	// An empty working directory of its own: the kubelet acts on paths
	// a runtime reports, which may be relative (see setLogPath).
	cmd.Dir = n.path("kubelet-cwd")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// unshare and sh exec into the kubelet: this process's child is the
	// kubelet, which dies with the test binary whatever kills it; its own
	// process group, so that stop reaches anything it runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the kubelet: %v", err)
	}
	k := &realKubelet{t: t, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		k.waitErr = cmd.Wait()
		close(k.exited)
	}()
	t.Cleanup(func() {
		k.stop()
		if t.Failed() {
			t.Logf("%s (last 150 lines):\n%s", logName, tail(logPath, 150))
			// The whole log outlives the node's directory where the API
			// server's is kept (TestMain names the directory).
			if data, err := os.ReadFile(logPath); err == nil && apiLogDir != "" {
				kept := filepath.Join(apiLogDir, "kubelet-"+nodeName+".log")
				if os.WriteFile(kept, data, 0o644) == nil {
					t.Logf("the whole kubelet log is kept in %s", kept)
				}
			}
		}
		if _, err := os.Stat(sentinel); err != nil {
			t.Errorf("the kubelet deleted a file in its working directory (a container log path it globbed?): %v", err)
		}
		// The namespace is gone with the kubelet: none of its mounts may be
		// left in this one.
		if left := mountsUnder(n.root); len(left) != 0 {
			t.Errorf("mounts left under %s after the kubelet exited: %q", n.root, left)
		}
	})
	return k
}

// stop sends SIGTERM to the kubelet's process group and waits up to 15 s
// before SIGKILL.
func (k *realKubelet) stop() {
	select {
	case <-k.exited:
		return
	default:
	}
	pgid := k.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-k.exited:
	case <-time.After(15 * time.Second):
		k.t.Errorf("the kubelet did not exit 15 s after SIGTERM; killing it")
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-k.exited
	}
}

// exitNote says whether (and how) the kubelet exited, with its last lines.
func (k *realKubelet) exitNote() string {
	select {
	case <-k.exited:
		return fmt.Sprintf("; the kubelet exited: %v:\n%s", k.waitErr, tail(k.logPath, 30))
	default:
		return ""
	}
}

// logLines is the kubelet's log lines that contain substr (the last max).
func (k *realKubelet) logLines(substr string, max int) string {
	data, _ := os.ReadFile(k.logPath)
	var lines []string
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, substr) {
			lines = append(lines, line)
		}
	}
	if len(lines) > max {
		lines = lines[len(lines)-max:]
	}
	return strings.Join(lines, "\n")
}

// tail is the last lines of the file at path.
func tail(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// mountsUnder is this process's mount points at or below dir.
func mountsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return []string{err.Error()}
	}
	var found []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && (fields[4] == dir || strings.HasPrefix(fields[4], dir+"/")) {
			found = append(found, fields[4])
		}
	}
	return found
}
