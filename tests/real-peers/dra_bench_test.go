package realpeers

// A benchmark, not a test CI runs: NodePrepareResources and
// NodeUnprepareResources through the kubelet's own DRA plugin client
// (pkg/kubelet/cm/dra/plugin: the DRAPluginManager the plugin watcher
// registers drivers with, one gRPC connection per plugin kept for its
// life), against the real kube-apiserver + etcd, for devhost (static
// backend) and for cmd/helper-driver (upstream's kubeletplugin helper),
// alternating the two in one run. Skipped unless DEVHOST_DRA_BENCH=1:
//
//	cargo build --release --bin devhost
//	cd tests/real-peers
//	DEVHOST_DRA_BENCH=1 DEVHOST_BIN=../../target/release/devhost \
//	    go test -count=1 -v -run TestDRAPrepareBenchmark .
//
// DEVHOST_DRA_BENCH_ROUNDS (default 100) sets the rounds;
// DEVHOST_DRA_BENCH_PHASES=1 also turns on devhost's debug lines of
// prepare's phases (they cost it a little) and reports where a new
// claim's time goes.

import (
	"bufio"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"context"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	drapbv1 "k8s.io/kubelet/pkg/apis/dra/v1"
	pluginregistration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	draplugin "k8s.io/kubernetes/pkg/kubelet/cm/dra/plugin"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
)

// helperDriver is the anchor driver's name.
const helperDriver = "helper.example.com"

// benchDevices is the devices each driver serves: a batch of 8 claims of
// one device each needs 8.
const benchDevices = 8

// benchCases are the measured calls, in the order of a round.
var benchCases = []string{"prepare new claim", "prepare repeated claim", "unprepare 1 claim", "prepare batch of 8 new", "unprepare batch of 8"}

// benchDriver is one driver under measurement.
type benchDriver struct {
	name    string
	label   string
	samples map[string][]time.Duration
}

func envInt(name string, fallback int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return fallback
}

func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Join(strings.Fields(string(data))[:3], " ")
}

// benchClaim creates a ResourceClaim of driverName allocated device (one
// request "gpus", one device) on nodeName's pool, as the scheduler leaves it.
func benchClaim(t *testing.T, ctx context.Context, client kubernetes.Interface, driverName, nodeName, name, device string) *drapbv1.Claim {
	t.Helper()
	claim, err := client.ResourceV1().ResourceClaims("default").Create(ctx, &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{{
			Name:    "gpus",
			Exactly: &resourceapi.ExactDeviceRequest{DeviceClassName: driverName, AllocationMode: resourceapi.DeviceAllocationModeExactCount, Count: 1},
		}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("ResourceClaim %s: %v", name, err)
	}
	claim.Status = resourceapi.ResourceClaimStatus{
		Allocation: &resourceapi.AllocationResult{
			Devices: resourceapi.DeviceAllocationResult{Results: []resourceapi.DeviceRequestAllocationResult{
				{Request: "gpus", Driver: driverName, Pool: nodeName, Device: device},
			}},
			NodeSelector: &v1.NodeSelector{NodeSelectorTerms: []v1.NodeSelectorTerm{{
				MatchFields: []v1.NodeSelectorRequirement{{Key: "metadata.name", Operator: v1.NodeSelectorOpIn, Values: []string{nodeName}}},
			}}},
		},
		ReservedFor: []resourceapi.ResourceClaimConsumerReference{{Resource: "pods", Name: "pod-" + name, UID: "uid-pod-" + claim.UID}},
	}
	claim, err = client.ResourceV1().ResourceClaims("default").UpdateStatus(ctx, claim, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("allocate ResourceClaim %s: %v", name, err)
	}
	return &drapbv1.Claim{Namespace: claim.Namespace, Name: claim.Name, Uid: string(claim.UID)}
}

// startHelperDriver builds cmd/helper-driver and runs it for nodeName on n,
// its CDI specs beside devhost's, its checkpoint in <root>/helper-state.
func startHelperDriver(t *testing.T, n *node, nodeName, kubeconfig string) {
	t.Helper()
	bin := n.path("helper-driver")
	build := exec.Command("go", "build", "-o", bin, "./cmd/helper-driver")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/helper-driver: %v\n%s", err, out)
	}
	logFile, err := os.Create(n.path("helper-driver.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "--driver", helperDriver, "--node", nodeName, "--kubeconfig", kubeconfig,
		"--kubelet-root", n.root, "--cdi-dir", n.path("cdi"), "--state-dir", n.path("helper-state"),
		"--data-dir", n.path("data"), "--devices", strconv.Itoa(benchDevices))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the helper driver: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
		if t.Failed() {
			data, _ := os.ReadFile(n.path("helper-driver.log"))
			t.Logf("helper-driver.log:\n%s", data)
		}
	})
}

// percentile is the p-th percentile (nearest rank) of sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	rank := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(rank, len(sorted)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d.Microseconds())/1000) }

// TestDRAPrepareBenchmarkAgainstTheUpstreamHelper measures, per round and
// per driver (the order alternating between rounds): NodePrepareResources
// of a new claim, of the same claim again, NodeUnprepareResources of it;
// NodePrepareResources of a batch of 8 new claims and their unprepare.
// Every answer is checked (devices, no error), so a driver that fails
// fails the benchmark. Claims are created and allocated in the API server
// before a round's timed calls, and deleted after them.
func TestDRAPrepareBenchmarkAgainstTheUpstreamHelper(t *testing.T) {
	if os.Getenv("DEVHOST_DRA_BENCH") != "1" {
		t.Skip("a benchmark: set DEVHOST_DRA_BENCH=1 (and DEVHOST_BIN to a release build) to run it")
	}
	rounds := envInt("DEVHOST_DRA_BENCH_ROUNDS", 100)
	const warmup = 5
	phases := os.Getenv("DEVHOST_DRA_BENCH_PHASES") == "1"
	a := realAPIServer(t)
	ctx, _ := testContext(t, 30*time.Minute)
	const nodeName = "node-bench"
	a.node(t, ctx, nodeName)
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)

	// devhost: the static backend with the devices and answers the helper
	// driver gives (a variable, a device node and a mount each); no health
	// files, so nothing polls.
	var b strings.Builder
	b.WriteString("[backend]\nkind = \"static\"\n[config]\n")
	fmt.Fprintf(&b, "[[config.resource]]\nname = %q\nenv = { DEVHOST_IDS = \"{ids}\" }\n", gpu)
	for i := range benchDevices {
		id := fmt.Sprintf("gpu-%d", i)
		if err := os.MkdirAll(n.path("data", id), 0o755); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "[[config.resource.device]]\nid = %q\n", id)
		fmt.Fprintf(&b, "device_spec = [{ host_path = \"/dev/null\", container_path = \"/dev/%s\", permissions = \"rw\" }]\n", id)
		fmt.Fprintf(&b, "mount = [{ host_path = %q, container_path = \"/data/%s\", read_only = %t }]\n", n.path("data", id), id, i%2 == 0)
		fmt.Fprintf(&b, "attributes = { \"example.com/model\" = \"peer-test\", \"example.com/index\" = %d }\n", i)
	}
	b.WriteString(draResource)
	n.write("config/backends.d/gpus.toml", b.String())
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))

	// The kubelet's DRA plugin manager behind its plugin watcher; its
	// start-up wipe of the node's slices is over before the drivers start.
	var pm *draplugin.DRAPluginManager
	awaitKubeletWipe(t, ctx, a.admin, nodeName, func() {
		pm = draplugin.NewDRAPluginManager(ctx, a.admin, nodeGetter(a.admin, nodeName, nil), nil, time.Minute)
		plugins := pluginmanager.NewPluginManager(n.path("plugins_registry"), &record.FakeRecorder{})
		plugins.AddHandler(pluginregistration.DRAPlugin, pm)
		stopCh := make(chan struct{})
		go plugins.Run(ctx, allSourcesReady{}, stopCh)
		t.Cleanup(func() { close(stopCh); pm.Stop() })
	})

	rustLog := "info"
	if phases {
		rustLog = "info,devhost::dra::prepare=debug"
	}
	d := startDevhostLogging(t, n, "devhost.log", rustLog)
	startHelperDriver(t, n, nodeName, kubeconfig)
	clients := map[string]*draplugin.DRAPlugin{}
	for _, name := range []string{driver, helperDriver} {
		eventually(t, wait, "the kubelet registers DRA driver "+name, func() (bool, string) {
			p, err := pm.GetPlugin(name)
			clients[name] = p
			return err == nil, fmt.Sprint(err, d.exitNote())
		})
		eventually(t, wait, "the API server holds the slices of "+name, func() (bool, string) {
			names, note := publishedDevices(ctx, a.admin, nodeName, name)
			return len(names) == benchDevices, note
		})
	}
	// The floor of a claim's read: client-go's GET of one, from this
	// process, with devhost's token (what both drivers' reads cost at least).
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	reader, err := kubernetes.NewForConfig(config)
	if err != nil {
		t.Fatal(err)
	}
	var reads []time.Duration
	drivers := []*benchDriver{
		{name: driver, label: "devhost", samples: map[string][]time.Duration{}},
		{name: helperDriver, label: "upstream helper", samples: map[string][]time.Duration{}},
	}

	timed := func(dr *benchDriver, what string, call func() error, round int) {
		t.Helper()
		start := time.Now()
		err := call()
		took := time.Since(start)
		if err != nil {
			t.Fatalf("%s, %s, round %d: %v", dr.label, what, round, err)
		}
		if round >= warmup {
			dr.samples[what] = append(dr.samples[what], took)
		}
	}
	prepare := func(dr *benchDriver, claims []*drapbv1.Claim) error {
		answer, err := clients[dr.name].NodePrepareResources(ctx, &drapbv1.NodePrepareResourcesRequest{Claims: claims})
		if err != nil {
			return err
		}
		for _, c := range claims {
			got := answer.GetClaims()[c.Uid]
			if got == nil || got.GetError() != "" || len(got.GetDevices()) != 1 || len(got.GetDevices()[0].GetCdiDeviceIds()) == 0 {
				return fmt.Errorf("claim %s: answer %v", c.Name, got)
			}
		}
		return nil
	}
	unprepare := func(dr *benchDriver, claims []*drapbv1.Claim) error {
		answer, err := clients[dr.name].NodeUnprepareResources(ctx, &drapbv1.NodeUnprepareResourcesRequest{Claims: claims})
		if err != nil {
			return err
		}
		for _, c := range claims {
			got := answer.GetClaims()[c.Uid]
			if got == nil || got.GetError() != "" {
				return fmt.Errorf("claim %s: answer %v", c.Name, got)
			}
		}
		return nil
	}

	loadBefore := loadAverage()
	started := time.Now()
	for round := range rounds + warmup {
		type work struct {
			one   *drapbv1.Claim
			batch []*drapbv1.Claim
		}
		claims := map[string]work{}
		for i, dr := range drivers {
			w := work{one: benchClaim(t, ctx, a.admin, dr.name, nodeName, fmt.Sprintf("r%d-d%d-one", round, i), "gpu-0")}
			for k := range benchDevices {
				w.batch = append(w.batch, benchClaim(t, ctx, a.admin, dr.name, nodeName, fmt.Sprintf("r%d-d%d-b%d", round, i, k), fmt.Sprintf("gpu-%d", k)))
			}
			claims[dr.name] = w
		}
		// Let the API server's own work on those writes settle.
		time.Sleep(20 * time.Millisecond)
		order := slices.Clone(drivers)
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, dr := range order {
			w := claims[dr.name]
			one := []*drapbv1.Claim{w.one}
			timed(dr, benchCases[0], func() error { return prepare(dr, one) }, round)
			timed(dr, benchCases[1], func() error { return prepare(dr, one) }, round)
			timed(dr, benchCases[2], func() error { return unprepare(dr, one) }, round)
			timed(dr, benchCases[3], func() error { return prepare(dr, w.batch) }, round)
			timed(dr, benchCases[4], func() error { return unprepare(dr, w.batch) }, round)
		}
		read := claims[driver].one
		start := time.Now()
		if _, err := reader.ResourceV1().ResourceClaims(read.Namespace).Get(ctx, read.Name, metav1.GetOptions{}); err != nil {
			t.Fatalf("read claim %s: %v", read.Name, err)
		}
		if round >= warmup {
			reads = append(reads, time.Since(start))
		}
		for _, w := range claims {
			for _, c := range append([]*drapbv1.Claim{w.one}, w.batch...) {
				if err := a.admin.ResourceV1().ResourceClaims("default").Delete(ctx, c.Name, metav1.DeleteOptions{}); err != nil {
					t.Fatalf("delete claim %s: %v", c.Name, err)
				}
			}
		}
	}
	loadAfter := loadAverage()

	// Nothing is left behind: every spec was removed at unprepare.
	if left, _ := filepath.Glob(n.path("cdi", "*claim*")); len(left) != 0 {
		t.Errorf("CDI specs left after every claim was unprepared: %q", left)
	}

	var table strings.Builder
	fmt.Fprintf(&table, "\n%d rounds (+%d warm-up) in %v, both drivers alternating; load average before %s, after %s; %d CPUs\n\n",
		rounds, warmup, time.Since(started).Round(time.Second), loadBefore, loadAfter, runtime.NumCPU())
	fmt.Fprintf(&table, "| call (ms) | devhost p50 | devhost p99 | helper p50 | helper p99 |\n|---|---|---|---|---|\n")
	for _, what := range benchCases {
		row := "| " + what
		for _, dr := range drivers {
			s := slices.Clone(dr.samples[what])
			sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
			row += " | " + ms(percentile(s, 50)) + " | " + ms(percentile(s, 99))
		}
		table.WriteString(row + " |\n")
	}
	sort.Slice(reads, func(i, j int) bool { return reads[i] < reads[j] })
	fmt.Fprintf(&table, "| floor: one claim's GET (client-go, this process, devhost's token) | %s | %s | | |\n", ms(percentile(reads, 50)), ms(percentile(reads, 99)))
	t.Log(table.String())
	if phases {
		t.Log(devhostPhases(t, d.log()))
	}
}

// phaseField is one `name=<n>` field of devhost's debug lines.
var phaseField = regexp.MustCompile(`\b([a-z_]+)=(\d+)\b`)

// devhostPhases is the median and p99 of each phase devhost's debug lines
// ("prepare batch", "unprepare batch": one per call, with its claims and
// how many were new or undone) report, by kind of call.
func devhostPhases(t *testing.T, log string) string {
	t.Helper()
	values := map[string][]int{}
	var names []string
	scanner := bufio.NewScanner(strings.NewReader(log))
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		line := scanner.Text()
		var call string
		switch {
		case strings.Contains(line, "unprepare batch"):
			call = "unprepare"
		case strings.Contains(line, "prepare batch"):
			call = "prepare"
		default:
			continue
		}
		fields := map[string]string{}
		var order []string
		for _, m := range phaseField.FindAllStringSubmatch(line, -1) {
			fields[m[1]] = m[2]
			order = append(order, m[1])
		}
		kind := fmt.Sprintf("%s claims=%s new=%s", call, fields["claims"], fields["new"]+fields["undone"])
		for _, name := range order {
			if !strings.HasSuffix(name, "_us") {
				continue
			}
			key := kind + ": " + strings.TrimSuffix(name, "_us")
			v, _ := strconv.Atoi(fields[name])
			if _, seen := values[key]; !seen {
				names = append(names, key)
			}
			values[key] = append(values[key], v)
		}
	}
	if len(names) == 0 {
		return "devhost logged no prepare phases (a build without them?)"
	}
	sort.Strings(names)
	var out strings.Builder
	out.WriteString("\ndevhost's phases (µs, median / p99 over every call, warm-up included):\n")
	for _, name := range names {
		v := values[name]
		sort.Ints(v)
		fmt.Fprintf(&out, "  %-48s %6d / %6d  (%d calls)\n", name, v[len(v)/2], v[max(0, int(math.Ceil(0.99*float64(len(v))))-1)], len(v))
	}
	return out.String()
}
