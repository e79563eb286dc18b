package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/goleak"
)

// The test binary doubles as the daemon: with this variable set it runs
// runMain on its arguments, so tests drive the real process, signals and
// exit codes included, without a separate build.
const asDaemon = "CONSOLEPROXY_TEST_AS_DAEMON"

func TestMain(m *testing.M) {
	if os.Getenv(asDaemon) == "1" {
		os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
	}
	code := m.Run()
	if err := goleak.Find(); code == 0 && err != nil {
		fmt.Fprintln(os.Stderr, "goroutines leaked:", err)
		code = 1
	}
	os.Exit(code)
}

const waitTimeout = 20 * time.Second

func TestUsageErrors(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(".", filepath.Join(dir, "link")); err != nil { // dir/link is dir
		t.Fatal(err)
	}
	up := "unix:" + filepath.Join(dir, "vmm.sock")
	ln := filepath.Join(dir, "c.sock")
	long := "/tmp/" + strings.Repeat("x", 110)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{}, "--upstream is required"},
		{[]string{"--upstream", up}, "--listen is required"},
		{[]string{"--upstream", up, "--listen", ln, "extra"}, `unexpected argument "extra"`},
		{[]string{"--upstream", up, "--listen", ln, "--bogus"}, "provided but not defined: -bogus"},
		{[]string{"--upstream", "ftp:x", "--listen", ln}, `unknown kind "ftp"`},
		{[]string{"--upstream", "pty:", "--listen", ln}, "empty path"},
		{[]string{"--upstream", "tcp:localhost", "--listen", ln}, "want tcp:HOST:PORT"},
		{[]string{"--upstream", "tcp:localhost:99999", "--listen", ln}, "not 1 to 65535"},
		{[]string{"--upstream", "listen:" + long, "--listen", ln}, "longer than the system limit"},
		{[]string{"--upstream", regular, "--listen", ln}, "neither a socket nor a character device"},
		{[]string{"--upstream", filepath.Join(dir, "missing"), "--listen", ln}, "cannot be inspected"},
		{[]string{"--upstream", "unix:" + long, "--listen", ln}, "longer than the system limit of 107"},
		{[]string{"--upstream", up, "--listen", long}, "--listen: socket path"},
		{[]string{"--upstream", up, "--listen", ln, "--listen-ro", long}, "--listen-ro: socket path"},
		{[]string{"--upstream", up, "--listen", ln, "--listen-ro", ln}, "--listen and --listen-ro name the same file"},
		{[]string{"--upstream", up, "--listen", strings.TrimPrefix(up, "unix:")}, "--upstream and --listen name the same file"},
		{[]string{"--upstream", "listen:" + ln, "--listen", filepath.Join(dir, ".", "c.sock")}, "--upstream and --listen name the same file"},
		{[]string{"--upstream", up, "--listen", ln, "--console-log", filepath.Join(dir, "x", "..", "c.sock")}, "--listen and --console-log name the same file"},
		{[]string{"--upstream", up, "--listen", ln, "--status", ln}, "--listen and --status name the same file"},
		{[]string{"--upstream", "unix:" + filepath.Join(dir, "*", "serial.sock"), "--listen", "{dir}/serial.sock"}, "--upstream and --listen name the same file"},
		{[]string{"--upstream", "unix:" + filepath.Join(dir, "vm-*.sock"), "--listen", filepath.Join(dir, "vm-{name}.console.sock")}, "the proxy's own sockets would be taken for consoles"},
		{[]string{"--upstream", "unix:" + filepath.Join(dir, "*.sock"), "--listen", filepath.Join(dir, "link", "{name}-c.sock")}, "the proxy's own sockets would be taken for consoles"},
		{[]string{"--upstream", "unix:" + filepath.Join(dir, "*.sock"), "--listen", filepath.Join(dir, "{name}.console"), "--status", filepath.Join(dir, "status.sock")}, "--status: " + filepath.Join(dir, "status.sock") + " matches the --upstream pattern"},
		{[]string{"--upstream", "unix:" + filepath.Join(dir, "vm-*.sock"), "--listen", "{dir}/console.sock"}, "it must hold {name}"},
		{[]string{"--upstream", "unix:" + filepath.Join(dir, "*", "s.sock"), "--listen", "{dir}/c.sock", "--status", "{dir}/st.sock"}, "--status: one status socket serves every console"},
		{[]string{"--upstream", up, "--listen", ln, "--status", "/run/{name}.sock"}, "--status: one status socket serves every console"},
		{[]string{"--upstream", up, "--listen", ln, "--buffer-size", "2K"}, "--buffer-size: 2K is outside 4KiB to 1GiB"},
		{[]string{"--upstream", up, "--listen", ln, "--buffer-size", "2GiB"}, "outside 4KiB to 1GiB"},
		{[]string{"--upstream", up, "--listen", ln, "--buffer-size", "12QB"}, "unknown unit"},
		{[]string{"--upstream", up, "--listen", ln, "--buffer-size", "-5"}, "not a size"},
		{[]string{"--upstream", up, "--listen", ln, "--replay", "some"}, "--replay"},
		{[]string{"--upstream", up, "--listen", ln, "--slow-client", "wait"}, "not skip or disconnect"},
		{[]string{"--upstream", up, "--listen", ln, "--max-clients", "0"}, "at least 1"},
		{[]string{"--upstream", up, "--listen", ln, "--max-clients", "many"}, "at least 1"},
		{[]string{"--upstream", up, "--listen", ln, "--socket-mode", "0999"}, "octal mode"},
		{[]string{"--upstream", up, "--listen", ln, "--socket-mode", "01777"}, "octal mode"},
		{[]string{"--upstream", up, "--listen", ln, "--log-level", "loud"}, "--log-level"},
		{[]string{"--upstream", up, "--listen", ln, "--log-format", "xml"}, "not text or json"},
		{[]string{"--upstream", up, "--listen", ln, "--notices=maybe"}, "invalid boolean"},
		{[]string{"--upstream", up, "--listen", ln, "--allow-uid", "0,,1"}, "--allow-uid: \"0,,1\" has an empty element"},
		{[]string{"--upstream", up, "--listen", ln, "--allow-gid", ","}, "--allow-gid"},
		{[]string{"--upstream", up, "--listen", ln, "--console-log-max-files", "3"}, "--console-log-max-files needs --console-log"},
		{[]string{"--upstream", up, "--listen", ln, "--console-log-timestamps"}, "--console-log-timestamps needs --console-log"},
		{[]string{"--upstream", up, "--listen", ln, "--console-log", "x.log", "--console-log-max-files", "-1"}, "at least 0"},
		{[]string{"--upstream", up, "--listen", ln, "--console-log", "x.log", "--console-log-max-size", "lots"}, "--console-log-max-size"},
	} {
		var stdout, stderr bytes.Buffer
		code := runMain(tc.args, &stdout, &stderr)
		msg := stderr.String()
		if code != 2 || !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 || stdout.Len() != 0 {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and one line containing %q", tc.args, code, msg, tc.want)
		}
	}
	if _, err := os.Stat(ln); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a usage error created %s", ln)
	}
}

func TestHelpAndVersion(t *testing.T) {
	for _, arg := range []string{"--help", "-h"} {
		var stdout, stderr bytes.Buffer
		if code := runMain([]string{arg}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "--upstream SPEC") {
			t.Errorf("%s: exit %d, stdout %q", arg, code, stdout.String())
		}
	}
	var stdout, stderr bytes.Buffer
	if code := runMain([]string{"--version"}, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), "consoleproxy ") {
		t.Errorf("--version: exit %d, stdout %q", code, stdout.String())
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"0", 0}, {"4096", 4096}, {"12B", 12}, {"4k", 4096}, {"4KiB", 4096}, {"4kib", 4096},
		{"1M", 1 << 20}, {"1MiB", 1 << 20}, {"16mib", 16 << 20}, {"1G", 1 << 30}, {"1GiB", 1 << 30},
	} {
		if got, err := parseSize(tc.in); err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", "K", "1.5M", "1MB", "1KB", "-1", "1 M", "99999999999G", "0x10"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

// daemon is the real consoleproxy process, run from the test binary.
type daemon struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan error
}

func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), asDaemon+"=1")
	d := &daemon{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = d.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-d.done
	})
	return d
}

// exitCode waits for the daemon to exit and returns its status.
func (d *daemon) exitCode(t *testing.T) int {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err // for the cleanup
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(waitTimeout):
		t.Fatalf("daemon did not exit; stderr:\n%s", d.stderr)
		return -1
	}
}

func waitForPath(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear", path)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSIGTERMDrainsClientsAndRemovesSocket(t *testing.T) {
	dir := t.TempDir()
	vmmPath, sock := filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "console.sock")
	vmm, err := net.Listen("unix", vmmPath)
	if err != nil {
		t.Fatal(err)
	}
	defer vmm.Close()
	d := startDaemon(t, "--upstream", "unix:"+vmmPath, "--listen", sock)
	up, err := vmm.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	up.Write([]byte("boot log\n"))
	waitForPath(t, sock)
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(waitTimeout))
	want := "[consoleproxy] upstream connected\r\nboot log\n"
	got := make([]byte, len(want))
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != want {
		t.Fatalf("replay %q, %v; want %q", got, err, want)
	}

	d.cmd.Process.Signal(syscall.SIGTERM)
	if code := d.exitCode(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM; stderr:\n%s", code, d.stderr)
	}
	if rest, err := io.ReadAll(conn); err != nil || len(rest) != 0 {
		t.Errorf("after SIGTERM the client read %q, %v; want a clean EOF", rest, err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file still there after SIGTERM: %v", err)
	}
}

func TestExitWithUpstream(t *testing.T) {
	dir := t.TempDir()
	vmmPath := filepath.Join(dir, "vmm.sock")
	vmm, err := net.Listen("unix", vmmPath)
	if err != nil {
		t.Fatal(err)
	}
	defer vmm.Close()
	d := startDaemon(t, "--upstream", "unix:"+vmmPath, "--listen", filepath.Join(dir, "c.sock"), "--exit-with-upstream")
	up, err := vmm.Accept()
	if err != nil {
		t.Fatal(err)
	}
	up.Close()
	if code := d.exitCode(t); code != 0 {
		t.Fatalf("exit %d when the upstream closed; stderr:\n%s", code, d.stderr)
	}
}

func TestRuntimeFailuresExit1(t *testing.T) {
	dir := t.TempDir()
	up := "unix:" + filepath.Join(dir, "vmm.sock")
	regular := filepath.Join(dir, "in-the-way")
	if err := os.WriteFile(regular, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ok := filepath.Join(dir, "ok.sock")
	for _, tc := range []struct {
		listen, want string
		extra        []string
	}{
		{filepath.Join(dir, "missing", "c.sock"), filepath.Join(dir, "missing"), nil},
		{regular, "is not a socket; not removing it", nil},
		{live, "a live process is listening on it", nil},
		{ok, `--allow-uid: user: unknown user no-such-user-here`, []string{"--allow-uid", "no-such-user-here"}},
		{ok, "socket group no-such-group-here: group: unknown group", []string{"--socket-group", "no-such-group-here"}},
	} {
		d := startDaemon(t, append([]string{"--upstream", up, "--listen", tc.listen}, tc.extra...)...)
		if code := d.exitCode(t); code != 1 {
			t.Errorf("--listen %s: exit %d, want 1", tc.listen, code)
		}
		msg := d.stderr.String()
		if !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("--listen %s: stderr %q, want one line containing %q", tc.listen, msg, tc.want)
		}
	}
	if b, err := os.ReadFile(regular); err != nil || string(b) != "keep me" {
		t.Errorf("the file in the way was changed: %q, %v", b, err)
	}
}

func TestAttachUsageErrors(t *testing.T) {
	long := "/tmp/" + strings.Repeat("x", 110)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach"}, "missing SOCKET"},
		{[]string{"attach", "--status", "/run/status.sock"}, "missing NAME"},
		{[]string{"attach", "a.sock", "b.sock"}, `unexpected argument "b.sock"`},
		{[]string{"attach", "--bogus", "a.sock"}, "provided but not defined: -bogus"},
		{[]string{"attach", "a.sock", "--bogus"}, "provided but not defined: -bogus"},
		{[]string{"attach", long}, "longer than the system limit"},
		{[]string{"attach", "--status", long, "vm1"}, "--status: socket path"},
		{[]string{"attach", "--escape", "^@", "a.sock"}, "--escape: \"^@\" is NUL"},
		{[]string{"attach", "--escape", "ctrl-x", "a.sock"}, "--escape"},
		{[]string{"attach", "--until", "(", "a.sock"}, "--until: error parsing regexp"},
		{[]string{"attach", "--timeout", "0", "a.sock"}, "--timeout"},
		{[]string{"attach", "--timeout", "soon", "a.sock"}, "--timeout"},
		{[]string{"attach", "--linger", "-1s", "a.sock"}, "--linger"},
		{[]string{"attach", "--read-only=maybe", "a.sock"}, "invalid boolean"},
	} {
		var stdout, stderr bytes.Buffer
		code := runMain(tc.args, &stdout, &stderr)
		msg := stderr.String()
		if code != 2 || !strings.HasPrefix(msg, "consoleproxy attach: ") || !strings.Contains(msg, tc.want) ||
			!strings.HasSuffix(msg, " (see consoleproxy attach --help)\n") || strings.Count(msg, "\n") != 1 || stdout.Len() != 0 {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and one line containing %q", tc.args, code, msg, tc.want)
		}
	}
}

func TestAttachHelp(t *testing.T) {
	for _, arg := range []string{"--help", "-h"} {
		var stdout, stderr bytes.Buffer
		if code := runMain([]string{"attach", arg}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "Examples:") || stderr.Len() != 0 {
			t.Errorf("attach %s: exit %d, stdout %q", arg, code, stdout.String())
		}
	}
	var stdout, stderr bytes.Buffer
	if runMain([]string{"--help"}, &stdout, &stderr); !strings.Contains(stdout.String(), "consoleproxy attach") {
		t.Error("the main --help does not mention consoleproxy attach")
	}
}

// TestAttachFlagsAnywhere: flags after the socket count, and "--" ends
// them.
func TestAttachFlagsAnywhere(t *testing.T) {
	a, err := parseAttachArgs([]string{"/run/vm1/console.sock", "--read-only", "--escape", "^O"})
	if err != nil || a.opts.Socket != "/run/vm1/console.sock" || !a.opts.ReadOnly || a.opts.Escape != 0x0f {
		t.Errorf("flags after the socket: %+v, %v", a, err)
	}
	a, err = parseAttachArgs([]string{"--", "--read-only"})
	if err != nil || a.opts.Socket != "--read-only" || a.opts.ReadOnly {
		t.Errorf("after --: %+v, %v", a, err)
	}
}

// TestHostModeUsageErrors: what the arguments alone show about a pattern
// and the host-mode flags is a one-line usage error, exit 2, and nothing
// is created, even with a match of the pattern waiting.
func TestHostModeUsageErrors(t *testing.T) {
	root := t.TempDir()
	vm1 := filepath.Join(root, "vms", "vm1")
	if err := os.MkdirAll(vm1, 0o755); err != nil {
		t.Fatal(err)
	}
	serial, err := net.Listen("unix", filepath.Join(vm1, "serial.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer serial.Close()
	pattern := "unix:" + filepath.Join(root, "vms", "*", "serial.sock")
	flat := "unix:" + filepath.Join(root, "vms", "vm-*.sock") // the '*' in the socket's own name
	single := "unix:" + filepath.Join(vm1, "serial.sock")
	listen := "{dir}/console.sock"
	status := filepath.Join(root, "status.sock")
	before := tree(t, root)
	for _, tc := range []struct {
		args []string
		want string
	}{
		// With a pattern, every console's own paths need {name} or {dir}.
		{[]string{"--upstream", pattern, "--listen", filepath.Join(root, "console.sock")},
			"--listen: with an --upstream pattern it must hold {name} or {dir}, so that each console has its own"},
		{[]string{"--upstream", pattern, "--listen", listen, "--listen-ro", filepath.Join(root, "ro.sock")},
			"--listen-ro: with an --upstream pattern it must hold {name} or {dir}"},
		{[]string{"--upstream", pattern, "--listen", listen, "--console-log", filepath.Join(root, "console.log")},
			"--console-log: with an --upstream pattern it must hold {name} or {dir}"},
		// Where the '*' is in the socket's own name, {dir} is one directory
		// for every console.
		{[]string{"--upstream", flat, "--listen", listen},
			"--listen: the '*' is in the socket's own name, so {dir} is the same for every console: it must hold {name}"},
		{[]string{"--upstream", flat, "--listen", "{dir}/{name}.console", "--console-log", "{dir}/console.log"},
			"--console-log: the '*' is in the socket's own name"},
		// Without a pattern, {name} and {dir} mean nothing.
		{[]string{"--upstream", single, "--listen", "{dir}/console.sock"}, "--listen: {name} and {dir} need an --upstream pattern with a '*'"},
		{[]string{"--upstream", single, "--listen", filepath.Join(root, "c.sock"), "--listen-ro", "/run/{name}.sock"}, "--listen-ro: {name} and {dir} need an --upstream pattern"},
		{[]string{"--upstream", single, "--listen", filepath.Join(root, "c.sock"), "--console-log", "/var/log/{name}.log"}, "--console-log: {name} and {dir} need an --upstream pattern"},
		// One status socket serves every console, in either mode.
		{[]string{"--upstream", pattern, "--listen", listen, "--status", "{dir}/status.sock"}, "--status: one status socket serves every console; it takes no {name} or {dir}"},
		{[]string{"--upstream", single, "--listen", filepath.Join(root, "c.sock"), "--status", "/run/{name}.sock"}, "--status: one status socket serves every console"},
		// A pattern needs unix: or pty:, and one '*'.
		{[]string{"--upstream", "tcp:*:4555", "--listen", listen}, `--upstream: "tcp:*:4555": a pattern ('*') needs the kind unix: or pty:`},
		{[]string{"--upstream", "listen:" + root + "/vms/*/serial.sock", "--listen", listen}, `--upstream: "listen:` + root + `/vms/*/serial.sock": a pattern ('*') needs the kind unix: or pty:`},
		{[]string{"--upstream", root + "/vms/*/serial.sock", "--listen", listen}, `--upstream: "` + root + `/vms/*/serial.sock": a pattern ('*') needs the kind unix: or pty:`},
		{[]string{"--upstream", "unix:" + root + "/*/*.sock", "--listen", listen}, "--upstream: " + root + "/*/*.sock has 2 '*'; a pattern has one"},
		// Host mode serves consoles as they come and go.
		{[]string{"--upstream", pattern, "--listen", listen, "--exit-with-upstream"}, "--exit-with-upstream does not go with an --upstream pattern"},
		{[]string{"--upstream", pattern, "--listen", listen, "--max-consoles", "0"}, `--max-consoles: "0" is not a whole number of at least 1`},
		{[]string{"--upstream", pattern, "--listen", listen, "--max-consoles", "x"}, `--max-consoles: "x" is not a whole number of at least 1`},
		{[]string{"--upstream", pattern, "--listen", listen, "--retire-after", "-1s"}, `--retire-after: "-1s" is not a positive duration such as 30s or 2m`},
		{[]string{"--upstream", pattern, "--listen", listen, "--retire-after", "soon"}, `--retire-after: "soon" is not a positive duration`},
		{[]string{"--upstream", pattern, "--listen", listen, "--retire-after", "0"}, `--retire-after: "0" is not a positive duration`},
		{[]string{"--upstream", single, "--listen", filepath.Join(root, "c.sock"), "--max-consoles", "8"}, "--max-consoles needs an --upstream pattern with a '*'"},
		{[]string{"--upstream", single, "--listen", filepath.Join(root, "c.sock"), "--retire-after", "1m"}, "--retire-after needs an --upstream pattern with a '*'"},
		// Flags that stop a start stop host mode too, before anything is
		// created.
		{[]string{"--upstream", pattern, "--listen", listen, "--status", status, "--buffer-size", "2K"}, "--buffer-size: 2K is outside 4KiB to 1GiB"},
	} {
		// The real process, so that a case that is not refused shows as
		// a daemon that does not exit, not as a test that hangs.
		d := startDaemon(t, tc.args...)
		code := d.exitCode(t)
		msg := d.stderr.String()
		if code != 2 || !strings.HasPrefix(msg, "consoleproxy: "+tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and one line starting %q", tc.args, code, msg, "consoleproxy: "+tc.want)
		}
		if after := tree(t, root); !slices.Equal(after, before) {
			t.Fatalf("%q created files: before %q, after %q", tc.args, before, after)
		}
	}
}

// tree lists every path below root, sorted.
func tree(t *testing.T, root string) []string {
	t.Helper()
	var paths []string
	err := filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		paths = append(paths, path)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return paths
}

// TestHelpFitsAndTeachesHostMode: --help fits an 80-column terminal,
// names every host-mode flag and placeholder, and its examples are
// command lines that parse.
func TestHelpFitsAndTeachesHostMode(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := runMain([]string{"--help"}, &stdout, &stderr); code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	help := stdout.String()
	for i, line := range strings.Split(help, "\n") {
		if n := utf8.RuneCountInString(line); n > 80 {
			t.Errorf("--help line %d is %d columns: %q", i+1, n, line)
		}
	}
	for _, want := range []string{"--max-consoles N", "--retire-after DURATION", "--status PATH", "{name}", "{dir}", "unix:/run/vms/*/serial.sock"} {
		if !strings.Contains(help, want) {
			t.Errorf("--help does not mention %s", want)
		}
	}
	// The examples: lines that start a consoleproxy command, with their
	// continuations, split as a shell would split these (single quotes).
	_, examples, _ := strings.Cut(help, "\nExamples:\n")
	examples = strings.ReplaceAll(examples, "\\\n", " ")
	seen := map[string]bool{}
	for _, line := range strings.Split(examples, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "consoleproxy ") {
			continue
		}
		line, _, _ = strings.Cut(line, "  (") // a trailing remark
		var args []string
		for i, part := range strings.Split(line, "'") {
			if i%2 == 1 {
				args = append(args, part) // quoted
				continue
			}
			args = append(args, strings.Fields(part)...)
		}
		args = args[1:]
		var err error
		if args[0] == "attach" {
			_, err = parseAttachArgs(args[1:])
			seen["attach"] = true
		} else {
			var o *options
			o, err = parseArgs(args)
			seen[fmt.Sprint(err == nil && o.pattern != nil)] = true
		}
		if err != nil {
			t.Errorf("the example %q does not parse: %v", line, err)
		}
	}
	if !seen["true"] || !seen["false"] || !seen["attach"] {
		t.Errorf("--help's examples want one console, host mode and attach; saw %v", seen)
	}
}
