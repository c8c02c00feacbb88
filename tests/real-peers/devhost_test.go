package realpeers

// The devhost side of every test: the real binary as a child process on a
// temporary node (its own kubelet root, config directory and log), and the
// small waiting helpers the tests share.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
)

// wait is how long any one thing may take to happen: generous, because CI
// machines are small and shared (the same figure as the Rust e2e tests).
const wait = 30 * time.Second

// devhostBinary is the devhost binary under test: $DEVHOST_BIN, or the
// workspace's debug build two directories up.
func devhostBinary(t *testing.T) string {
	t.Helper()
	path := os.Getenv("DEVHOST_BIN")
	if path == "" {
		path = filepath.Join("..", "..", "target", "debug", "devhost")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		t.Fatalf("devhost binary %q: %v", path, err)
	}
	info, err := os.Stat(abs)
	if err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
		t.Fatalf("no devhost binary at %s (run `cargo build` in the repository root first, or set DEVHOST_BIN): %v", abs, err)
	}
	return abs
}

// node is one temporary kubelet root with devhost's config beside it:
//
//	<root>/device-plugins/      the device plugin directory (kubelet.sock)
//	<root>/plugins_registry/    the plugin watcher's directory
//	<root>/plugins/             DRA service sockets
//	<root>/config/devhost.toml  host settings, backends.d/ beside it
//	<root>/cdi/                 CDI specs (the only directory the runtime reads)
//	<root>/data/<id>/           what a static device mounts
type node struct {
	t    *testing.T
	root string
	// devices are the static backends' devices by ID.
	devices map[string]staticDevice
}

func newNode(t *testing.T) *node {
	t.Helper()
	// Not t.TempDir(): Unix socket paths are limited to 107 bytes, and the
	// test's name would go into the path.
	root, err := os.MkdirTemp("", "devhost-peers-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	n := &node{t: t, root: root}
	for _, dir := range []string{"device-plugins", "plugins_registry", "plugins", "config/backends.d", "cdi", "state", "health"} {
		if err := os.MkdirAll(n.path(dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

func (n *node) path(elem ...string) string {
	return filepath.Join(append([]string{n.root}, elem...)...)
}

func (n *node) write(rel, text string) string {
	n.t.Helper()
	path := n.path(rel)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		n.t.Fatal(err)
	}
	return path
}

// hostConfig writes devhost.toml. dra, when set, is the [dra] table's body.
func (n *node) hostConfig(dra string) {
	// cdi_spec_dirs = []: the runtime reads only the node's own CDI
	// directory (cdi_dir), not the machine's /etc/cdi and /var/run/cdi.
	text := fmt.Sprintf("call_timeout_ms = 5000\nmetrics_address = \"127.0.0.1:0\"\ncdi_dir = %q\ncdi_spec_dirs = []\n"+
		"[pod_resources]\nsocket = %q\n[log]\nformat = \"text\"\nlevel = \"debug\"\n",
		n.path("cdi"), n.path("pod-resources", "kubelet.sock"))
	if dra != "" {
		text += "[dra]\n" + dra
	}
	n.write("config/devhost.toml", text)
}

// setHealthy makes a device of staticBackend healthy (its health file
// exists) or unhealthy.
func (n *node) setHealthy(id string, healthy bool) {
	n.t.Helper()
	path := n.path("health", id+".ok")
	var err error
	if healthy {
		err = os.WriteFile(path, nil, 0o644)
	} else {
		err = os.Remove(path)
	}
	if err != nil {
		n.t.Fatal(err)
	}
}

// staticDevice is what staticBackend gives one device: a device node (a
// real host node, since runtimes stat it) and a bind mount of a directory
// of its own.
type staticDevice struct {
	node  answerDevice
	mount answerMount
}

// staticBackend is a backends.d file of devhost's built-in static backend:
// one resource, each device healthy while <root>/health/<id>.ok exists
// (created here), on NUMA node 0, with a device node and a mount of its
// own, and envs and an annotation in every Allocate answer. extra is
// appended verbatim (host tables such as [resources."<name>"]).
func (n *node) staticBackend(name, resource string, ids []string, extra string) {
	n.t.Helper()
	n.staticBackendNamed(name, resource, "", ids, extra)
}

// staticBackendNamed is staticBackend whose answers also carry the
// backend's own CDI names <cdiKind>=<id> (its cdi_kind; devhost refuses the
// backend unless a spec in the CDI directories defines every such name).
func (n *node) staticBackendNamed(name, resource, cdiKind string, ids []string, extra string) {
	n.t.Helper()
	var b strings.Builder
	b.WriteString("[backend]\nkind = \"static\"\n[config]\nhealth_interval_ms = 50\n")
	fmt.Fprintf(&b, "[[config.resource]]\nname = %q\npreferred_allocation = true\npre_start = true\n", resource)
	b.WriteString("env = { DEVHOST_IDS = \"{ids}\" }\n")
	b.WriteString("annotations = { \"example.com/allocated-by\" = \"devhost\" }\n")
	if cdiKind != "" {
		fmt.Fprintf(&b, "cdi_kind = %q\n", cdiKind)
	}
	if n.devices == nil {
		n.devices = map[string]staticDevice{}
	}
	for i, id := range ids {
		n.setHealthy(id, true)
		// Every other device's mount is read-only: both kinds get checked.
		dev := staticDevice{
			node:  answerDevice{HostPath: "/dev/null", ContainerPath: "/dev/" + id, Permissions: "rw"},
			mount: answerMount{HostPath: n.path("data", id), ContainerPath: "/data/" + id, ReadOnly: i%2 == 0},
		}
		if err := os.MkdirAll(dev.mount.HostPath, 0o755); err != nil {
			n.t.Fatal(err)
		}
		n.devices[id] = dev
		fmt.Fprintf(&b, "[[config.resource.device]]\nid = %q\nnuma = [0]\nhealth_path = %q\n", id, n.path("health", id+".ok"))
		fmt.Fprintf(&b, "device_spec = [{ host_path = %q, container_path = %q, permissions = %q }]\n",
			dev.node.HostPath, dev.node.ContainerPath, dev.node.Permissions)
		fmt.Fprintf(&b, "mount = [{ host_path = %q, container_path = %q, read_only = %t }]\n",
			dev.mount.HostPath, dev.mount.ContainerPath, dev.mount.ReadOnly)
		fmt.Fprintf(&b, "attributes = { \"example.com/model\" = \"peer-test\", \"example.com/index\" = %d }\n", i)
	}
	b.WriteString(extra)
	n.write("config/backends.d/"+name+".toml", b.String())
}

// staticAnswer is what a backend staticBackend wrote answers for ids
// (in the order of the request): DEVHOST_IDS lists them, and each brings
// its device node and mount. Annotations and CDI names are left out: they
// are not edits of the container.
func (n *node) staticAnswer(ids []string) backendAnswer {
	n.t.Helper()
	a := backendAnswer{Env: map[string]string{"DEVHOST_IDS": strings.Join(ids, ",")}}
	for _, id := range ids {
		dev, ok := n.devices[id]
		if !ok {
			n.t.Fatalf("no static device %q on this node", id)
		}
		a.Devices = append(a.Devices, dev.node)
		a.Mounts = append(a.Mounts, dev.mount)
	}
	return a
}

// devhost is `devhost run` as a child process; stopped (SIGTERM, then
// SIGKILL) when the test ends, its log shown if the test failed.
type devhost struct {
	t       *testing.T
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
}

func startDevhost(t *testing.T, n *node, logName string) *devhost {
	t.Helper()
	return startDevhostLogging(t, n, logName, "devhost=debug,info")
}

// startDevhostLogging is startDevhost with devhost's log filter rustLog
// (RUST_LOG).
func startDevhostLogging(t *testing.T, n *node, logName, rustLog string) *devhost {
	t.Helper()
	bin := devhostBinary(t)
	logPath := n.path(logName)
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "run", "--config", n.path("config", "devhost.toml"), "--plugin-dir", n.path("device-plugins"))
	cmd.Env = append(os.Environ(), "RUST_LOG="+rustLog, "NO_COLOR=1")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Dies with the test binary, whatever kills it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	d := &devhost{t: t, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("%s (last 120 lines):\n%s", logName, d.logTail(120))
		}
	})
	return d
}

// stop sends SIGTERM and waits up to 10 s before SIGKILL; returns how
// long the process took to exit.
func (d *devhost) stop() time.Duration {
	start := time.Now()
	select {
	case <-d.exited:
		return 0
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.t.Errorf("devhost did not exit 10 s after SIGTERM; killing it")
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	return time.Since(start)
}

func (d *devhost) log() string {
	data, _ := os.ReadFile(d.logPath)
	return string(data)
}

func (d *devhost) logTail(lines int) string {
	all := strings.Split(strings.TrimRight(d.log(), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// metricsAddress is the address devhost logged for /metrics and /readyz.
func (d *devhost) metricsAddress() string {
	d.t.Helper()
	const marker = "serving /metrics, /healthz and /readyz address="
	var address string
	eventually(d.t, wait, "devhost logs its metrics address", func() (bool, string) {
		log := d.log()
		i := strings.Index(log, marker)
		if i < 0 {
			return false, d.exitNote()
		}
		fields := strings.Fields(log[i+len(marker):])
		if len(fields) == 0 {
			return false, ""
		}
		address = fields[0]
		return true, ""
	})
	return address
}

func (d *devhost) exitNote() string {
	select {
	case <-d.exited:
		return fmt.Sprintf("devhost exited: %v", d.waitErr)
	default:
		return ""
	}
}

// get fetches http://<metrics address><path>: status and body.
func (d *devhost) get(path string) (int, string) {
	d.t.Helper()
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + d.metricsAddress() + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// metric is the value of one exact series line of /metrics ("" if absent).
func (d *devhost) metric(series string) string {
	_, body := d.get("/metrics")
	scanner := bufio.NewScanner(strings.NewReader(body))
	for scanner.Scan() {
		if rest, ok := strings.CutPrefix(scanner.Text(), series+" "); ok {
			return strings.TrimSpace(rest)
		}
	}
	return ""
}

// eventually polls check every 50 ms until it returns true, failing the
// test after timeout with what and check's last note.
func eventually(t *testing.T, timeout time.Duration, what string, check func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, note := check()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s; last: %s", timeout, what, note)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// testContext is a context that ends with the test (or after limit),
// carrying a logger that writes the kubelet code's log lines into the
// test's output (-v shows them; nothing is logged after the test ends).
func testContext(t *testing.T, limit time.Duration) (context.Context, klog.Logger) {
	logger := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.Verbosity(3)))
	ctx := klog.NewContext(context.Background(), logger)
	ctx, cancel := context.WithTimeoutCause(ctx, limit, errors.New("test time limit"))
	t.Cleanup(cancel)
	return ctx, logger
}
