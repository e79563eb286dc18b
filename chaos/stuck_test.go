package chaos

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/e2e"
)

// startDaemonWithStderr starts the daemon with its stderr on the write end
// of a pipe the test controls, and waits until it serves clients.
func startDaemonWithStderr(t *testing.T, dir string, extra ...string) (d *daemon, stderr *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	sock := filepath.Join(dir, "console.sock")
	args := append([]string{"--upstream", "unix:" + filepath.Join(dir, "vmm.sock"), "--listen", sock}, extra...)
	p := e2e.StartWith(t, func(p *e2e.Proc) { p.Cmd.Stderr = w }, nil, binary, args...)
	w.Close() // the daemon holds the only write end now
	e2e.WaitFor(t, "the daemon to serve", func() bool {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return &daemon{Proc: p, sock: sock}, r
}

// churn connects and closes n clients, each after its replay, so that the
// daemon logs two lines for each.
func churn(t *testing.T, sock string, n int) {
	t.Helper()
	for range n {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
}

// stopCleanly sends SIGTERM and expects exit 0 with the socket removed.
func stopCleanly(t *testing.T, d *daemon) {
	t.Helper()
	d.Cmd.Process.Signal(syscall.SIGTERM)
	if code := d.Wait(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM (-1: killed by a signal)", code)
	}
	if _, err := os.Lstat(d.sock); err == nil {
		t.Error("the socket file was left behind")
	}
}

// restartAndStream kills the VMM, starts another and checks that a client
// attached across the restart receives what both wrote.
func restartAndStream(t *testing.T, dir string, v *vmm, cl *client) {
	t.Helper()
	conn := v.waitConn(t)
	conn.Write(pattern(0, 64<<10))
	cl.reached(t, "the first VM's output", 64<<10)
	v.kill()
	v2 := startVMM(t, filepath.Join(dir, "vmm.sock"))
	v2.waitConn(t).Write(pattern(64<<10, 64<<10))
	cl.reached(t, "the restarted VM's output", 128<<10)
}

func TestStalledStderrStopsNothing(t *testing.T) {
	dir := t.TempDir()
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	// Clients that left are released a moment later: room for all.
	d, stderr := startDaemonWithStderr(t, dir, "--log-level", "debug", "--max-clients", "100000")
	// Nobody reads stderr: the pipe fills, as with a stopped journald.
	// Far more lines than the pipe holds:
	start := time.Now()
	lines := scale(1000, 5000)
	churn(t, d.sock, lines)
	cl := attach(t, d.sock, 0)
	restartAndStream(t, dir, v, cl)
	figure(t, "stderr never read: %d clients came and went (%d log lines) and a VM restart streamed on, in %v",
		lines, 2*lines, time.Since(start).Round(time.Millisecond))

	// Once stderr drains, a line says how many lines were dropped.
	var logged bytes.Buffer
	done := make(chan struct{})
	go func() {
		io.Copy(&logged, stderr)
		close(done)
	}()
	stopCleanly(t, d)
	<-done
	if !strings.Contains(logged.String(), "daemon log lines dropped") {
		t.Errorf("no line counts the dropped lines; stderr ends:\n%s", lastLines(logged.String(), 5))
	}
}

func TestBrokenStderrStopsNothing(t *testing.T) {
	dir := t.TempDir()
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	d, stderr := startDaemonWithStderr(t, dir, "--max-clients", "100000")
	// stderr's reader goes away (consoleproxy ... 2>&1 | head).
	stderr.Close()
	churn(t, d.sock, 10)
	cl := attach(t, d.sock, 0)
	restartAndStream(t, dir, v, cl)
	stopCleanly(t, d)
}

func TestDeafVMMWithTypingClients(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	ro := filepath.Join(dir, "view.sock")
	vmmPath := filepath.Join(dir, "vmm.sock")
	// A VMM that accepts and never reads: a hung guest no longer drains
	// its UART.
	ln, err := net.Listen("unix", vmmPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := startDaemon(t, dir, "--max-clients", "64", "--listen-ro", ro, "--console-log", logPath)
	vmmConn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer vmmConn.Close()

	// 63 clients type more than the daemon queues and leave.
	typed := bytes.Repeat([]byte("y"), 64<<10)
	start := time.Now()
	for range 63 {
		c, err := net.Dial("unix", d.sock)
		if err != nil {
			t.Fatal(err)
		}
		// The replay first: a client that closed before it was written
		// would be closed by the proxy's failed write, input unread.
		c.SetDeadline(time.Now().Add(e2e.WaitTimeout))
		if _, err := io.ReadFull(c, make([]byte, len("[consoleproxy] upstream connected\r\n"))); err != nil {
			t.Fatalf("replay: %v", err)
		}
		if _, err := c.Write(typed); err != nil {
			t.Fatalf("typing: %v", err)
		}
		c.Close()
	}
	typing := time.Since(start)
	e2e.WaitFor(t, "the typists to be released", func() bool { return strings.Count(d.Stderr.String(), "client disconnected") == 63 })
	// The operator's signals are answered.
	start = time.Now()
	d.stats(t)
	statsTook := time.Since(start)
	d.Cmd.Process.Signal(syscall.SIGHUP)
	e2e.WaitFor(t, "the log reopen", func() bool { return strings.Contains(d.Stderr.String(), "console log reopened") })
	// The table has room: 64 clients, viewers and typists, all admitted.
	var conns []net.Conn
	for i := range 64 {
		path := d.sock
		if i%2 == 1 {
			path = ro
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(e2e.WaitTimeout))
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		if strings.Contains(string(buf[:n]), "too many clients") || n == 0 {
			t.Fatalf("client %d after the typists left received %q", i, buf[:n])
		}
		c.Close()
	}
	e2e.WaitFor(t, "the outage to be logged", func() bool { return strings.Contains(d.Stderr.String(), "not reading input") })
	if n := strings.Count(d.Stderr.String(), "not reading input"); n != 1 {
		t.Errorf("the VMM's input outage was logged %d times, want once", n)
	}
	figure(t, "deaf VMM: 63 clients typed 64 KiB each and left in %v; SIGUSR1 answered in %v; SIGHUP reopened the log; 64 new clients admitted",
		typing.Round(time.Millisecond), statsTook.Round(time.Millisecond))
	stopCleanly(t, d)
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}
