package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// verifyUnit runs systemd-analyze verify and security on unit (the file
// name within dir, or an instance of a template there): verify must print
// nothing, and the exposure must be 2.0 or below (20 on the 0-100 scale
// of --threshold).
func verifyUnit(t *testing.T, unit string) {
	t.Helper()
	out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput()
	if err != nil || len(out) != 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", filepath.Base(unit), err, out)
	}
	out, err = exec.Command("systemd-analyze", "security", "--offline=true", "--threshold=20", unit).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security %s: exposure above 2.0 (scale 0-100: 20): %v\n%s", filepath.Base(unit), err, out[max(0, len(out)-300):])
	}
}

// contribUnit writes the unit from contrib/systemd into a temporary
// directory, with ExecStart pointing at the binary under test (verify
// checks that it exists), and returns its path and text.
func contribUnit(t *testing.T, name string) (path, text string) {
	t.Helper()
	unit, err := os.ReadFile(filepath.Join("..", "contrib", "systemd", name))
	if err != nil {
		t.Fatal(err)
	}
	text = strings.ReplaceAll(string(unit), "/usr/local/bin/consoleproxy", binary)
	path = filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, text
}

// TestSystemdUnitVerifies checks the template unit, instantiated.
func TestSystemdUnitVerifies(t *testing.T) {
	Need(t, "systemd-analyze")
	path, _ := contribUnit(t, "consoleproxy@.service")
	instance := filepath.Join(filepath.Dir(path), "consoleproxy@vm1.service")
	if err := os.Symlink("consoleproxy@.service", instance); err != nil {
		t.Fatal(err)
	}
	verifyUnit(t, instance)
}

// TestSystemdHostUnitVerifies checks the unit that serves a whole host.
func TestSystemdHostUnitVerifies(t *testing.T) {
	Need(t, "systemd-analyze")
	path, _ := contribUnit(t, "consoleproxy-host.service")
	verifyUnit(t, path)
}

// TestSystemdHostUnitCommandLineWorks runs the host unit's ExecStart as
// systemd would split it, with its directories moved into a temporary one
// (systemd itself cannot run here): a VM that appears gets its client
// socket, its console log lands in the one log directory the unit has
// systemd create, and the status socket answers.
func TestSystemdHostUnitCommandLineWorks(t *testing.T) {
	Need(t, "nc", "jq", "socat")
	_, text := contribUnit(t, "consoleproxy-host.service")
	args := execStart(t, text)
	if len(args) == 0 || args[0] != binary {
		t.Fatalf("ExecStart %q does not run consoleproxy", args)
	}
	args = args[1:]
	root := t.TempDir()
	move := strings.NewReplacer("/run/vms", root+"/vms", "/var/log/consoleproxy", root+"/log", "/run/consoleproxy", root+"/run")
	for i := range args {
		args[i] = move.Replace(args[i])
	}
	// What systemd makes: ExecStartPre's /run/vms, LogsDirectory= and
	// RuntimeDirectory=.
	for _, d := range []string{"vms", "log", "run"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o750); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"LogsDirectory=consoleproxy\n", "RuntimeDirectory=consoleproxy\n", "ExecStartPre=+/bin/mkdir -p /run/vms\n", "ReadWritePaths=/run/vms\n"} {
		if !strings.Contains(text, want) {
			t.Fatalf("the unit no longer has %q, which this test stands in for", want)
		}
	}
	serveOneVM(t, args, filepath.Join(root, "vms"), filepath.Join(root, "run", "status.sock"),
		func(vm string) string { return filepath.Join(root, "vms", vm, "console.sock") },
		func(vm string) string { return filepath.Join(root, "log", vm+".log") })
}

// serveOneVM runs consoleproxy with args (a host-mode command line whose
// directories exist), makes a VM with a fake VMM at vms/vm1/serial.sock,
// and checks its console: the client socket at listen("vm1") replays its
// output, the console log at log("vm1") gets it, and the status socket
// lists it with those paths.
func serveOneVM(t *testing.T, args []string, vms, status string, listen, log func(string) string) {
	t.Helper()
	daemon := Start(t, nil, binary, args...)
	WaitFor(t, "the status socket", func() bool {
		select {
		case <-daemon.Done:
			t.Fatalf("consoleproxy %q exited: %s", args, daemon.Stderr)
		default:
		}
		_, err := os.Stat(status)
		return err == nil
	})
	vm := filepath.Join(vms, "vm1")
	if err := os.Mkdir(vm, 0o700); err != nil {
		t.Fatal(err)
	}
	startVMM(t, filepath.Join(vm, "serial.sock"))
	sock := listen("vm1")
	WaitFor(t, "vm1's client socket", func() bool { _, err := os.Stat(sock); return err == nil })
	client := Start(t, strings.NewReader(""), "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
	if client.Wait(t); client.Stdout.String() != replay {
		t.Errorf("vm1's console replayed %q, want %q; daemon: %s", client.Stdout, replay, daemon.Stderr)
	}
	logPath := log("vm1")
	WaitFor(t, "vm1's console log", func() bool {
		b, _ := os.ReadFile(logPath)
		return strings.Contains(string(b), "guest login: ")
	})
	doc, _ := readStatus(t, status)
	if len(doc.Consoles) != 1 || doc.Consoles[0].Name != "vm1" || doc.Consoles[0].Listen != sock || doc.Consoles[0].ConsoleLog != logPath {
		t.Errorf("status: %+v", doc.Consoles)
	}
}

// execStart returns the unit's ExecStart= command line split as systemd
// splits it, for what the contrib units use: backslash-newline
// continuations, single and double quotes, no specifiers or variables.
func execStart(t *testing.T, unit string) []string {
	t.Helper()
	unit = strings.ReplaceAll(unit, "\\\n", " ")
	var line string
	for _, l := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStart="); ok {
			line = v
		}
	}
	if strings.ContainsAny(line, "%$") {
		t.Fatalf("ExecStart %q holds a specifier or a variable, which this test does not expand", line)
	}
	var args []string
	var cur strings.Builder
	inArg := false
	var quote rune
	for _, r := range line {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '\'' || r == '"':
			quote, inArg = r, true
		case r == ' ' || r == '\t':
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteRune(r)
			inArg = true
		}
	}
	if quote != 0 {
		t.Fatalf("ExecStart %q: unterminated quote", line)
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args
}

// daemonSet is the part of the DaemonSet example this test reads.
type daemonSet struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Spec       struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Template struct {
			Metadata struct {
				Labels map[string]string `json:"labels"`
			} `json:"metadata"`
			Spec struct {
				Containers []struct {
					Args            []string `json:"args"`
					SecurityContext struct {
						ReadOnlyRootFilesystem   *bool `json:"readOnlyRootFilesystem"`
						AllowPrivilegeEscalation *bool `json:"allowPrivilegeEscalation"`
						Capabilities             struct {
							Drop []string `json:"drop"`
							Add  []string `json:"add"`
						} `json:"capabilities"`
					} `json:"securityContext"`
					Resources struct {
						Requests map[string]string `json:"requests"`
						Limits   map[string]string `json:"limits"`
					} `json:"resources"`
					VolumeMounts []struct {
						Name      string `json:"name"`
						MountPath string `json:"mountPath"`
					} `json:"volumeMounts"`
				} `json:"containers"`
				Volumes []struct {
					Name     string `json:"name"`
					HostPath *struct {
						Path string `json:"path"`
					} `json:"hostPath"`
				} `json:"volumes"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

// TestKubernetesDaemonSet checks the DaemonSet example without a cluster:
// it must parse as YAML (PyYAML, as python3-yaml), hold one DaemonSet whose
// selector matches its pods, with a read-only root, no privilege
// escalation, every capability dropped but CHOWN, a memory limit, and
// every mount a hostPath at the same path inside as on the node (so the
// status document's paths are the node's). Its container's arguments,
// with the mounts moved into a temporary root, must serve a VM, and name
// no path outside the mounts (the root file system is read-only).
func TestKubernetesDaemonSet(t *testing.T) {
	Need(t, "python3", "nc", "jq", "socat")
	const toJSON = `import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))`
	out, err := exec.Command("python3", "-c", toJSON, filepath.Join("..", "contrib", "kubernetes", "consoleproxy-daemonset.yaml")).CombinedOutput()
	if err != nil && strings.Contains(string(out), "No module named 'yaml'") {
		t.Skip("python3's yaml module is not installed; .ci/run installs python3-yaml")
	}
	if err != nil {
		t.Fatalf("the DaemonSet is not valid YAML: %v\n%s", err, out)
	}
	var docs []daemonSet
	if err := json.Unmarshal(out, &docs); err != nil {
		t.Fatal(err)
	}
	if len(docs) != 1 || docs[0].APIVersion != "apps/v1" || docs[0].Kind != "DaemonSet" {
		t.Fatalf("want one apps/v1 DaemonSet, got %s", out)
	}
	ds := docs[0].Spec
	for k, v := range ds.Selector.MatchLabels {
		if ds.Template.Metadata.Labels[k] != v {
			t.Errorf("the selector's %s=%s is not on the pods (%v)", k, v, ds.Template.Metadata.Labels)
		}
	}
	if len(ds.Selector.MatchLabels) == 0 || len(ds.Template.Spec.Containers) != 1 {
		t.Fatalf("want a selector and one container: %s", out)
	}
	c := ds.Template.Spec.Containers[0]
	sc := c.SecurityContext
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		!slices.Equal(sc.Capabilities.Drop, []string{"ALL"}) || slices.ContainsFunc(sc.Capabilities.Add, func(c string) bool { return c != "CHOWN" }) {
		t.Errorf("security context: readOnlyRootFilesystem %v, allowPrivilegeEscalation %v, capabilities %+v; want a read-only root, no privilege escalation, ALL dropped and at most CHOWN added",
			deref(sc.ReadOnlyRootFilesystem), deref(sc.AllowPrivilegeEscalation), sc.Capabilities)
	}
	if c.Resources.Limits["memory"] == "" || c.Resources.Requests["cpu"] == "" {
		t.Errorf("resources %+v: want a memory limit and a CPU request", c.Resources)
	}
	hostPaths := map[string]string{}
	for _, v := range ds.Template.Spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	root := t.TempDir()
	var moves []string
	for _, m := range c.VolumeMounts {
		if hostPaths[m.Name] != m.MountPath {
			t.Errorf("mount %s at %s: want a hostPath volume at the same path, got %q", m.Name, m.MountPath, hostPaths[m.Name])
		}
		if err := os.MkdirAll(root+m.MountPath, 0o750); err != nil {
			t.Fatal(err)
		}
		moves = append(moves, m.MountPath, root+m.MountPath)
	}
	move := strings.NewReplacer(moves...)
	args := make([]string, len(c.Args))
	for i, a := range c.Args {
		args[i] = move.Replace(a)
		if _, v, ok := strings.Cut(args[i], "="); ok && strings.Contains(v, "/") && !strings.Contains(v, root) && !strings.HasPrefix(v, "{dir}") {
			t.Errorf("argument %q names a path outside the mounts", a)
		}
	}
	vms := root + "/run/vms"
	serveOneVM(t, args, vms, root+"/run/consoleproxy/status.sock",
		func(vm string) string { return filepath.Join(vms, vm, "console.sock") },
		func(vm string) string { return root + "/var/log/consoleproxy/" + vm + ".log" })
}

func deref(b *bool) any {
	if b == nil {
		return "unset"
	}
	return *b
}
