package realpeers

// cmd/cdi-inject, the oracle the Rust end-to-end tests ask what a container
// gets from devhost's answers: the facts of the CDI library (v1.1.0, as in
// containerd 2.2 and CRI-O) those tests rely on, checked against the real
// library so that a change in it (a go.mod bump) shows here first.

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// injected is cmd/cdi-inject's answer.
type injected struct {
	SpecErrors []string `json:"spec_errors"`
	Unresolved []string `json:"unresolved"`
	Error      string   `json:"error"`
	Env        []string `json:"env"`
	Devices    []struct {
		Path   string `json:"path"`
		Type   string `json:"type"`
		Major  int64  `json:"major"`
		Minor  int64  `json:"minor"`
		Access string `json:"access"`
	} `json:"devices"`
	Mounts []struct {
		Destination string   `json:"destination"`
		Source      string   `json:"source"`
		Options     []string `json:"options"`
	} `json:"mounts"`
	DevicesByName map[string]string `json:"devices_by_name"`
}

// envValue is what the container's process sees for name: runc (and crun)
// let the last entry of a name win.
func (r *injected) envValue(name string) (string, bool) {
	value, found := "", false
	for _, entry := range r.Env {
		if n, v, ok := strings.Cut(entry, "="); ok && n == name {
			value, found = v, true
		}
	}
	return value, found
}

// cdiSpec writes a CDI spec file of kind vendor.com/gpu into dir and
// returns its path; devices is the YAML of its `devices:` list.
func cdiSpec(t *testing.T, dir, file, globalEnv, devices string) string {
	t.Helper()
	text := "cdiVersion: \"0.6.0\"\nkind: vendor.com/gpu\n"
	if globalEnv != "" {
		text += "containerEdits:\n  env: " + globalEnv + "\n"
	}
	text += "devices:\n" + devices
	path := filepath.Join(dir, file)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// cdiDevice is one entry of a spec's `devices:` list that sets env.
func cdiDevice(name, env string) string {
	return "- name: \"" + name + "\"\n  containerEdits:\n    env: " + env + "\n"
}

func rdev(t *testing.T, path string) (int64, int64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
}

func TestCdiInjectAppliesNamesAsTheRuntimesLibraryDoes(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cdi-inject")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/cdi-inject").CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/cdi-inject: %v\n%s", err, out)
	}
	run := func(t *testing.T, input string, dirs ...string) injected {
		t.Helper()
		var args []string
		for _, dir := range dirs {
			args = append(args, "--spec-dir", dir)
		}
		cmd := exec.Command(bin, args...)
		cmd.Stdin = strings.NewReader(input)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cdi-inject: %v\n%s", err, stderr.String())
		}
		var r injected
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("cdi-inject's answer: %v\n%s", err, out)
		}
		return r
	}

	t.Run("a repeated env name keeps the last value", func(t *testing.T) {
		dir := t.TempDir()
		cdiSpec(t, dir, "gpu.yaml", `["WHO=spec", "SPEC_ONLY=1"]`, cdiDevice("0", `["WHO=device"]`))
		r := run(t, `{"envs": {"WHO": "plain"}, "cdi_devices": ["vendor.com/gpu=0"]}`, dir)
		if r.Error != "" {
			t.Fatalf("injection failed: %+v", r)
		}
		// Within the CDI edits a name is replaced in place (spec-wide edits
		// first, then the device's); against the spec's existing env it is
		// appended (runtime-tools keys its cache by the whole NAME=value),
		// so the raw list holds both and the runtime's last-wins decides.
		want := []string{"WHO=plain", "WHO=device", "SPEC_ONLY=1"}
		if !slices.Equal(r.Env, want) {
			t.Errorf("env %q, want %q", r.Env, want)
		}
		if v, _ := r.envValue("WHO"); v != "device" {
			t.Errorf("WHO=%q, want the CDI device's value", v)
		}
	})

	t.Run("two specs in one dir defining a name make it unresolvable", func(t *testing.T) {
		dir := t.TempDir()
		cdiSpec(t, dir, "a.yaml", "", cdiDevice("0", `["FROM=a"]`))
		cdiSpec(t, dir, "b.json", "", cdiDevice("0", `["FROM=b"]`)+cdiDevice("1", `["FROM=b1"]`))
		r := run(t, `{"envs": {"PLAIN": "1"}, "cdi_devices": ["vendor.com/gpu=0"]}`, dir)
		if !slices.Equal(r.Unresolved, []string{"vendor.com/gpu=0"}) || r.Error == "" {
			t.Errorf("unresolved %q, error %q: want the name unresolved", r.Unresolved, r.Error)
		}
		if !slices.ContainsFunc(r.SpecErrors, func(e string) bool { return strings.Contains(e, "conflicting device") }) {
			t.Errorf("spec errors %q: want a conflicting device", r.SpecErrors)
		}
		if !slices.Equal(r.Env, []string{"PLAIN=1"}) || len(r.DevicesByName) != 0 {
			t.Errorf("env %q, devices by name %v: want nothing from CDI", r.Env, r.DevicesByName)
		}
		// The other names of the same files still resolve.
		if r := run(t, `{"cdi_devices": ["vendor.com/gpu=1"]}`, dir); r.Error != "" || !slices.Equal(r.Env, []string{"FROM=b1"}) {
			t.Errorf("vendor.com/gpu=1: %+v", r)
		}
	})

	t.Run("a later spec dir wins silently", func(t *testing.T) {
		low, high := t.TempDir(), t.TempDir()
		cdiSpec(t, low, "gpu.yaml", "", cdiDevice("0", `["FROM=low"]`))
		winner := cdiSpec(t, high, "gpu.yaml", "", cdiDevice("0", `["FROM=high"]`))
		r := run(t, `{"cdi_devices": ["vendor.com/gpu=0"]}`, low, high)
		if r.Error != "" || len(r.SpecErrors) != 0 {
			t.Fatalf("error %q, spec errors %q: want none", r.Error, r.SpecErrors)
		}
		if v, _ := r.envValue("FROM"); v != "high" || len(r.Env) != 1 {
			t.Errorf("env %q: want only the later dir's", r.Env)
		}
		if r.DevicesByName["vendor.com/gpu=0"] != winner {
			t.Errorf("defined in %q, want %q", r.DevicesByName["vendor.com/gpu=0"], winner)
		}
		// Reversed, the other one wins: priority is the dir's place.
		if r := run(t, `{"cdi_devices": ["vendor.com/gpu=0"]}`, high, low); !slices.Equal(r.Env, []string{"FROM=low"}) {
			t.Errorf("reversed dirs: env %q, want the low dir's", r.Env)
		}
	})

	t.Run("a conflict in a lower dir hides the name even from a later dir", func(t *testing.T) {
		low, high := t.TempDir(), t.TempDir()
		cdiSpec(t, low, "a.yaml", "", cdiDevice("0", `["FROM=a"]`))
		cdiSpec(t, low, "b.yaml", "", cdiDevice("0", `["FROM=b"]`))
		cdiSpec(t, high, "gpu.yaml", "", cdiDevice("0", `["FROM=high"]`))
		r := run(t, `{"cdi_devices": ["vendor.com/gpu=0"]}`, low, high)
		if !slices.Equal(r.Unresolved, []string{"vendor.com/gpu=0"}) {
			t.Errorf("unresolved %q, env %q: want the name unresolved", r.Unresolved, r.Env)
		}
	})

	t.Run("a plain device and a CDI device node", func(t *testing.T) {
		dir := t.TempDir()
		cdiSpec(t, dir, "gpu.yaml", "", `- name: "0"
  containerEdits:
    deviceNodes:
    - {path: /dev/gpu0, hostPath: /dev/zero, permissions: r}
    - {path: /dev/ctl, hostPath: /dev/zero}
    mounts:
    - {hostPath: /tmp, containerPath: /a/b/c}
    - {hostPath: /etc, containerPath: /z, options: [ro, bind]}
`)
		r := run(t, `{"devices": [{"container_path": "/dev/plain", "host_path": "/dev/null", "permissions": "rw"}],
			"mounts": [{"container_path": "/m/n", "host_path": "/var", "read_only": true}],
			"cdi_devices": ["vendor.com/gpu=0"]}`, dir)
		if r.Error != "" {
			t.Fatalf("injection failed: %+v", r)
		}
		nullMajor, nullMinor := rdev(t, "/dev/null")
		zeroMajor, zeroMinor := rdev(t, "/dev/zero")
		type node struct {
			path, kind   string
			major, minor int64
			access       string
		}
		var got []node
		for _, d := range r.Devices {
			got = append(got, node{d.Path, d.Type, d.Major, d.Minor, d.Access})
		}
		// The CDI nodes' numbers come from their host nodes; no permissions
		// means rwm. Both CDI nodes are /dev/zero: one cgroup identity, so
		// each is reachable with the union of the two rules.
		want := []node{
			{"/dev/plain", "c", nullMajor, nullMinor, "rw"},
			{"/dev/gpu0", "c", zeroMajor, zeroMinor, "rwm"},
			{"/dev/ctl", "c", zeroMajor, zeroMinor, "rwm"},
		}
		if !slices.Equal(got, want) {
			t.Errorf("devices %+v, want %+v", got, want)
		}
		// CDI mounts sort every mount by depth (stable), the plain ones too.
		var order []string
		for _, m := range r.Mounts {
			order = append(order, m.Destination)
		}
		if !slices.Equal(order, []string{"/z", "/m/n", "/a/b/c"}) {
			t.Errorf("mounts in order %q", order)
		}
	})

	t.Run("a missing name is unresolved and nothing is applied", func(t *testing.T) {
		dir := t.TempDir()
		cdiSpec(t, dir, "gpu.yaml", "", cdiDevice("0", `["FROM=gpu0"]`))
		r := run(t, `{"envs": {"PLAIN": "1"}, "cdi_devices": ["vendor.com/gpu=0", "vendor.com/gpu=9"]}`, dir)
		if !slices.Equal(r.Unresolved, []string{"vendor.com/gpu=9"}) || !strings.Contains(r.Error, "vendor.com/gpu=9") {
			t.Errorf("unresolved %q, error %q", r.Unresolved, r.Error)
		}
		if !slices.Equal(r.Env, []string{"PLAIN=1"}) {
			t.Errorf("env %q: the resolvable name must not be applied either", r.Env)
		}
	})

	t.Run("a one-letter class in any spec file panics the library", func(t *testing.T) {
		dir := t.TempDir()
		cdiSpec(t, dir, "gpu.yaml", "", cdiDevice("0", `["A=1"]`))
		text := "cdiVersion: \"0.6.0\"\nkind: vendor.com/g\ndevices:\n" + cdiDevice("0", `["A=1"]`)
		if err := os.WriteFile(filepath.Join(dir, "g.yaml"), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		r := run(t, `{"cdi_devices": ["vendor.com/gpu=0"]}`, dir)
		if !strings.Contains(r.Error, "panicked") {
			t.Errorf("error %q: v1.1.0 panics on a one-letter class (fixed in this version?)", r.Error)
		}
	})

	t.Run("a plain device that is not a device node is refused", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(file, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		r := run(t, `{"devices": [{"container_path": "/dev/x", "host_path": "`+file+`"}]}`)
		if !strings.Contains(r.Error, "not a device node") {
			t.Errorf("error %q", r.Error)
		}
	})

	t.Run("bad input is an error exit", func(t *testing.T) {
		for _, input := range []string{"not json", `{"cdi": []}`} {
			cmd := exec.Command(bin)
			cmd.Stdin = strings.NewReader(input)
			if err := cmd.Run(); err == nil {
				t.Errorf("input %q: exit 0", input)
			}
		}
	})
}
