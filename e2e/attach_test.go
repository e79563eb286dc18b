package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// terminal is a pseudo-terminal with a process on its far side, as a
// person's terminal emulator has: the test types into the master and reads
// the screen from it.
type terminal struct {
	master *os.File
	tty    *os.File // the process's side; held open to read its settings
	screen SyncBuffer
	done   chan struct{} // closed when the screen reader ends
}

// openTerminal opens a pseudo-terminal, with /dev/ptmx and ioctls rather
// than a library: the master stays in Go's poller, so closing it ends the
// reader.
func openTerminal(t *testing.T) *terminal {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	err = control(master, func(fd int) error {
		if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
			return err
		}
		var err error
		n, err = unix.IoctlGetInt(fd, unix.TIOCGPTN)
		return err
	})
	if err != nil {
		master.Close()
		t.Fatalf("unlock the pseudo-terminal: %v", err)
	}
	tty, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		t.Fatal(err)
	}
	term := &terminal{master: master, tty: tty, done: make(chan struct{})}
	go func() {
		defer close(term.done)
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			term.screen.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		master.Close()
		tty.Close()
		<-term.done
	})
	return term
}

// control runs f with the file's descriptor, leaving the file in the
// poller (f.Fd would take it out).
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var fnErr error
	if err := rc.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}

// settings returns the terminal's termios as the process sees them.
func (term *terminal) settings(t *testing.T) unix.Termios {
	t.Helper()
	var tio *unix.Termios
	err := control(term.tty, func(fd int) error {
		var err error
		tio, err = unix.IoctlGetTermios(fd, unix.TCGETS)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return *tio
}

// start runs the program with the terminal as its controlling terminal
// and its standard streams, in a session of its own, as a shell would.
func (term *terminal) start(t *testing.T, name string, args ...string) *Proc {
	t.Helper()
	return StartWith(t, func(p *Proc) {
		p.Cmd.Stdin, p.Cmd.Stdout, p.Cmd.Stderr = term.tty, term.tty, term.tty
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	}, nil, name, args...)
}

// typeKeys writes keystrokes as a person types them.
func (term *terminal) typeKeys(t *testing.T, keys string) {
	t.Helper()
	if _, err := term.master.WriteString(keys); err != nil {
		t.Fatalf("type %q: %v", keys, err)
	}
}

func (term *terminal) waitScreen(t *testing.T, what string) {
	t.Helper()
	WaitFor(t, "the screen to show "+strconv.Quote(what), func() bool { return strings.Contains(term.screen.String(), what) })
}

// attachInTerminal starts consoleproxy attach on sock in a fresh terminal
// and waits for its header line, which it prints once raw mode is on. It
// returns the terminal's settings from before.
func attachInTerminal(t *testing.T, sock string, extra ...string) (*terminal, *Proc, unix.Termios) {
	t.Helper()
	term := openTerminal(t)
	before := term.settings(t)
	p := term.start(t, binary, append(append([]string{"attach"}, extra...), sock)...)
	term.waitScreen(t, "consoleproxy attach: attached to "+sock+" (type ^] to detach)\r\n")
	return term, p, before
}

// TestAttachInTerminal: a person attaches, types Ctrl-C (which must reach
// the VM, not stop attach), runs a command, and detaches with Ctrl-]; the
// terminal is as it was.
func TestAttachInTerminal(t *testing.T) {
	sock, _, v := startProxyIn(t, t.TempDir())
	term, p, before := attachInTerminal(t, sock)

	raw := term.settings(t)
	if raw.Lflag&(unix.ICANON|unix.ECHO|unix.ISIG) != 0 || raw.Iflag&(unix.ICRNL|unix.IXON) != 0 {
		t.Errorf("terminal not raw while attached: lflag %#o iflag %#o", raw.Lflag, raw.Iflag)
	}
	term.waitScreen(t, "guest login: ") // the replay

	term.typeKeys(t, "\x03")
	WaitFor(t, "Ctrl-C to reach the VMM as 0x03", func() bool { return strings.Contains(v.input(), "\x03") })
	// Enter first, to end the line Ctrl-C is on at the fake VMM.
	term.typeKeys(t, "\runame -a\r")
	term.waitScreen(t, "Linux guest 6.1.0 x86_64 GNU/Linux")
	select {
	case <-p.Done:
		t.Fatalf("attach exited after Ctrl-C; screen: %q", term.screen.String())
	default:
	}

	term.typeKeys(t, "\x1d")
	if code := p.Wait(t); code != 0 {
		t.Fatalf("exit %d after the escape; screen: %q", code, term.screen.String())
	}
	if after := term.settings(t); after != before {
		t.Errorf("terminal settings after the escape differ:\nbefore %+v\nafter  %+v", before, after)
	}
	if got := v.input(); got != "\x03\runame -a\r" {
		t.Errorf("the VMM received %q, want Ctrl-C and the command, without the escape", got)
	}
}

// TestAttachRestoresTerminal: every other way out restores the terminal
// too, and says why on one line.
func TestAttachRestoresTerminal(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(daemon, attach *Proc)
		why  string
	}{
		{"the proxy stops", func(daemon, _ *Proc) { daemon.Cmd.Process.Signal(syscall.SIGTERM) }, "consoleproxy attach: connection closed\r\n"},
		{"SIGTERM", func(_, attach *Proc) { attach.Cmd.Process.Signal(syscall.SIGTERM) }, "consoleproxy attach: received terminated\r\n"},
		{"SIGHUP", func(_, attach *Proc) { attach.Cmd.Process.Signal(syscall.SIGHUP) }, "consoleproxy attach: received hangup\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock, daemon, _ := startProxyIn(t, t.TempDir())
			term, p, before := attachInTerminal(t, sock)
			term.waitScreen(t, "guest login: ")
			tc.end(daemon, p)
			if code := p.Wait(t); code != 1 {
				t.Fatalf("exit %d, want 1; screen: %q", code, term.screen.String())
			}
			if after := term.settings(t); after != before {
				t.Fatalf("terminal settings afterwards differ:\nbefore %+v\nafter  %+v", before, after)
			}
			// The reason is printed after the terminal is restored, so the
			// line discipline turned its newline into CR LF; the prompt's
			// line was ended first.
			term.waitScreen(t, "guest login: \r\n"+tc.why)
		})
	}
}

// TestAttachWriteErrorRestoresTerminal: output that cannot be written
// (standard output is a pipe nobody reads, as in attach | head after head
// left) ends attach with the reason, not a SIGPIPE death in raw mode.
func TestAttachWriteErrorRestoresTerminal(t *testing.T) {
	sock, _, v := startProxyIn(t, t.TempDir(), "--replay", "none")
	term := openTerminal(t)
	before := term.settings(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	p := StartWith(t, func(p *Proc) {
		p.Cmd.Stdin, p.Cmd.Stdout, p.Cmd.Stderr = term.tty, w, term.tty
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	}, nil, binary, "attach", sock)
	w.Close()
	term.waitScreen(t, "consoleproxy attach: attached to "+sock)
	v.write(t, []byte("output nobody reads\r\n"))
	if code := p.Wait(t); code != 1 {
		t.Fatalf("exit %d, want 1; screen: %q", code, term.screen.String())
	}
	if after := term.settings(t); after != before {
		t.Fatalf("terminal settings afterwards differ:\nbefore %+v\nafter  %+v", before, after)
	}
	term.waitScreen(t, "consoleproxy attach: standard output: write /dev/stdout: broken pipe\r\n")
}

// attachScript runs consoleproxy attach without a terminal.
func attachScript(t *testing.T, stdin string, args ...string) *Proc {
	t.Helper()
	var in io.Reader // nil: /dev/null
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	return Start(t, in, binary, append([]string{"attach"}, args...)...)
}

// oneLine checks that stderr is exactly the one line want.
func oneLine(t *testing.T, p *Proc, want string) {
	t.Helper()
	if got := p.Stderr.String(); got != want+"\n" {
		t.Errorf("stderr %q, want the one line %q", got, want)
	}
}

// TestAttachUntilAcrossReads: the VMM writes half of the pattern, waits
// until attach has printed it (so the halves are two reads), then the
// rest: attach exits 0 at the match, and prints nothing after it.
func TestAttachUntilAcrossReads(t *testing.T) {
	sock, daemon, v := startProxyIn(t, t.TempDir())
	p := attachScript(t, "", "--read-only", "--until", `READY-\d+`, "--timeout", "30s", sock)
	WaitFor(t, "attach to connect", func() bool { return strings.Contains(daemon.Stderr.String(), "client connected") })
	v.write(t, []byte("\r\nboot done, REA"))
	WaitFor(t, "attach to print the first half", func() bool { return strings.HasSuffix(p.Stdout.String(), "REA") })
	v.write(t, []byte("DY-42 and what follows"))
	if code := p.Wait(t); code != 0 {
		t.Fatalf("exit %d: %s", code, p.Stderr)
	}
	if got := p.Stdout.String(); !strings.HasSuffix(got, "guest login: \r\nboot done, READY-42") {
		t.Errorf("printed %q", got)
	}
}

func TestAttachTimeout(t *testing.T) {
	sock, _, _ := startProxyIn(t, t.TempDir())
	start := time.Now()
	p := attachScript(t, "", "--read-only", "--until", "never printed", "--timeout", "300ms", sock)
	if code := p.Wait(t); code != 1 {
		t.Fatalf("exit %d, want 1: %s", code, p.Stderr)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("exited after %v, before the timeout", d)
	}
	oneLine(t, p, `consoleproxy attach: timed out: no match for "never printed" within 300ms`)
	if !strings.HasSuffix(p.Stdout.String(), "guest login: ") {
		t.Errorf("the output was not printed meanwhile: %q", p.Stdout)
	}
}

// TestAttachEndOfInput: a command piped in is sent and answered, and
// attach keeps printing while output keeps coming, each piece within
// --linger of the last, for several times --linger in all; then, once
// --linger passes without output, it leaves by itself.
func TestAttachEndOfInput(t *testing.T) {
	sock, _, v := startProxyIn(t, t.TempDir(), "--replay", "none")
	const linger = 500 * time.Millisecond
	p := attachScript(t, "uname -a\n", "--linger", linger.String(), sock)
	want := "\r\nLinux guest 6.1.0 x86_64 GNU/Linux\r\n"
	printed := func(s string) bool {
		deadline := time.Now().Add(WaitTimeout)
		for !strings.HasSuffix(p.Stdout.String(), s) {
			select {
			case <-p.Done:
				return false
			case <-time.After(2 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				return false
			}
		}
		return true
	}
	if !printed(want) {
		t.Fatalf("no answer; stdout %q, stderr %q", p.Stdout, p.Stderr)
	}
	for i, start := 0, time.Now(); time.Since(start) < 3*linger; i++ {
		line := fmt.Sprintf("kernel message %d\r\n", i)
		v.write(t, []byte(line))
		if !printed(line) {
			out := p.Stdout.String()
			t.Fatalf("attach left %v after the answer, while output kept coming; stdout ends %q", time.Since(start), out[max(0, len(out)-100):])
		}
		want += line
	}
	if code := p.Wait(t); code != 0 {
		t.Fatalf("exit %d: %s", code, p.Stderr)
	}
	if got := p.Stdout.String(); got != want {
		t.Errorf("printed %q, want %q", got, want)
	}
	if got := v.input(); got != "uname -a\n" {
		t.Errorf("the VMM received %q", got)
	}
	if p.Stderr.String() != "" {
		t.Errorf("stderr %q", p.Stderr)
	}
}

// TestAttachReadOnlySendsNothing: with a command on stdin and the
// read-write socket, --read-only sends nothing: the proxy counts no input
// and the VMM receives zero bytes.
func TestAttachReadOnlySendsNothing(t *testing.T) {
	sock, daemon, v := startProxyIn(t, t.TempDir())
	p := attachScript(t, "uname -a\n", "--read-only", "--until", "guest login: ", sock)
	if code := p.Wait(t); code != 0 {
		t.Fatalf("exit %d: %s", code, p.Stderr)
	}
	WaitFor(t, "the proxy to see the client go", func() bool { return strings.Contains(daemon.Stderr.String(), "client disconnected") })
	if !regexp.MustCompile(`client disconnected: .*bytes_in=0 `).MatchString(daemon.Stderr.String()) {
		t.Errorf("the proxy counted input from a read-only attach:\n%s", daemon.Stderr)
	}
	if got := v.input(); got != "" {
		t.Errorf("the VMM received %q from a read-only attach", got)
	}
}

// TestAttachRefused: the proxy's refusal notice is the reason given.
func TestAttachRefused(t *testing.T) {
	sock, daemon, _ := startProxyIn(t, t.TempDir(), "--max-clients", "1")
	first, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	WaitFor(t, "the first client", func() bool { return strings.Contains(daemon.Stderr.String(), "client connected") })
	p := attachScript(t, "", sock)
	if code := p.Wait(t); code != 1 {
		t.Fatalf("exit %d, want 1: %s", code, p.Stderr)
	}
	oneLine(t, p, "consoleproxy attach: connection closed: too many clients (max 1)")
}

func TestAttachUsageError(t *testing.T) {
	p := attachScript(t, "", "--until", "(", "/tmp/console.sock")
	if code := p.Wait(t); code != 2 {
		t.Fatalf("exit %d, want 2", code)
	}
	oneLine(t, p, "consoleproxy attach: --until: error parsing regexp: missing closing ): `(` (see consoleproxy attach --help)")
	p = attachScript(t, "", filepath.Join(t.TempDir(), "missing.sock"))
	if code := p.Wait(t); code != 1 {
		t.Fatalf("a missing socket: exit %d, want 1", code)
	}
	if got := p.Stderr.String(); strings.Count(got, "\n") != 1 || !strings.Contains(got, "no such file or directory") {
		t.Errorf("a missing socket: stderr %q", got)
	}
}

// statusSocket serves doc, as the daemon's status socket does: one JSON
// document and a newline per connection, then close.
func statusSocket(t *testing.T, doc any) string {
	t.Helper()
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, '\n')
	path := filepath.Join(t.TempDir(), "status.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write(b)
			c.Close()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return path
}

// TestAttachByName finds the console in a status document and attaches to
// its read-only socket with --read-only; an unknown name lists the names.
func TestAttachByName(t *testing.T) {
	dir := t.TempDir()
	ro := filepath.Join(dir, "console-ro.sock")
	sock, daemon, _ := startProxyIn(t, dir, "--listen-ro", ro)
	status := statusSocket(t, map[string]any{
		"version": "test", "uptime_seconds": 1.5,
		"consoles": []map[string]any{
			{"name": "vm1", "upstream": "unix:" + filepath.Join(dir, "vmm.sock"), "upstream_up": true, "upstream_connects": 1,
				"upstream_bytes": 46, "listen": sock, "listen_ro": ro, "console_log": "", "log_bytes_not_logged": 0, "clients": []any{}},
			{"name": "vm2", "upstream": "unix:/nonexistent/vmm.sock", "listen": "/nonexistent/console.sock", "listen_ro": "", "clients": []any{}},
		},
	})
	p := attachScript(t, "", "--status", status, "--read-only", "--until", "guest login: ", "vm1")
	if code := p.Wait(t); code != 0 {
		t.Fatalf("exit %d: %s", code, p.Stderr)
	}
	if !regexp.MustCompile(`client connected: .*read_only=true`).MatchString(daemon.Stderr.String()) {
		t.Errorf("attach did not use the read-only socket:\n%s", daemon.Stderr)
	}

	p = attachScript(t, "", "--status", status, "vm3")
	if code := p.Wait(t); code != 1 {
		t.Fatalf("unknown name: exit %d, want 1", code)
	}
	oneLine(t, p, `consoleproxy attach: no console "vm3" in `+status+`; there are "vm1", "vm2"`)
	p = attachScript(t, "", "--status", status, "--read-only", "vm2")
	if code := p.Wait(t); code != 1 {
		t.Fatalf("no read-only socket: exit %d, want 1", code)
	}
	oneLine(t, p, `consoleproxy attach: no read-only socket: console "vm2" (the daemon runs without --listen-ro)`)
}

// TestAttachInTmux: a person in tmux types the attach command into a
// shell, runs a command in the VM, reads the answer on the screen, and
// detaches; the shell's prompt comes back and says attach exited 0.
func TestAttachInTmux(t *testing.T) {
	Need(t, "tmux")
	dir := t.TempDir()
	sock, _, _ := startProxyIn(t, dir)
	server := filepath.Join(dir, "tmux.sock")
	tmux := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("tmux", append([]string{"-S", server, "-f", "/dev/null"}, args...)...)
		cmd.Env = append(os.Environ(), "TMUX=")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("tmux %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	// A plain shell with a prompt to look for, and a screen wide enough
	// for the command line.
	tmux("new-session", "-d", "-s", "attach", "-x", "200", "-y", "40",
		"env", "-i", "PATH="+os.Getenv("PATH"), "TERM=screen", "PS1=tmux-shell$ ", "sh")
	t.Cleanup(func() {
		exec.Command("tmux", "-S", server, "kill-server").Run()
	})
	screen := func() string { return tmux("capture-pane", "-p", "-t", "attach") }
	waitScreen := func(what string, cond func(string) bool) {
		t.Helper()
		var last string
		deadline := time.Now().Add(WaitTimeout)
		for last = screen(); !cond(last); last = screen() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; the screen:\n%s", what, last)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitScreen("the shell's prompt", func(s string) bool { return strings.Contains(s, "tmux-shell$") })

	tmux("send-keys", "-t", "attach", binary+" attach "+sock, "Enter")
	waitScreen("attach's header and the replay", func(s string) bool {
		return strings.Contains(s, "attached to "+sock+" (type ^] to detach)") && strings.Contains(s, "guest login:")
	})
	tmux("send-keys", "-t", "attach", "uname -a", "Enter")
	waitScreen("the answer", func(s string) bool { return strings.Contains(s, "Linux guest 6.1.0 x86_64 GNU/Linux") })
	tmux("send-keys", "-t", "attach", "C-]")
	waitScreen("the shell's prompt again", func(s string) bool { return strings.Count(s, "tmux-shell$") == 2 })
	tmux("send-keys", "-t", "attach", "echo attach-exit-$?", "Enter")
	waitScreen("the prompt back, and attach's exit status", func(s string) bool {
		return regexp.MustCompile(`(?m)^attach-exit-0$`).MatchString(s)
	})
	lines := strings.Split(strings.TrimRight(screen(), "\n "), "\n")
	if last := strings.TrimSpace(lines[len(lines)-1]); last != "tmux-shell$" {
		t.Errorf("the last line on the screen is %q, want the shell's prompt; the screen:\n%s", last, screen())
	}
}
