package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
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
	daemon := Start(t, nil, args[0], args[1:]...)
	status := filepath.Join(root, "run", "status.sock")
	WaitFor(t, "the status socket", func() bool { _, err := os.Stat(status); return err == nil })

	vm := filepath.Join(root, "vms", "vm1")
	if err := os.Mkdir(vm, 0o700); err != nil {
		t.Fatal(err)
	}
	startVMM(t, filepath.Join(vm, "serial.sock"))
	sock := filepath.Join(vm, "console.sock")
	WaitFor(t, "vm1's client socket", func() bool { _, err := os.Stat(sock); return err == nil })
	client := Start(t, strings.NewReader(""), "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
	if client.Wait(t); client.Stdout.String() != replay {
		t.Errorf("vm1's console replayed %q, want %q; daemon: %s", client.Stdout, replay, daemon.Stderr)
	}
	logPath := filepath.Join(root, "log", "vm1.log")
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
