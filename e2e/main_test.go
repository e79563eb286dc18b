package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

const waitTimeout = 30 * time.Second

// binary is the consoleproxy built for this run by TestMain.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "consoleproxy-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "consoleproxy")
	build := exec.Command("go", "build", "-race", "-o", binary, "github.com/consoleproxy/consoleproxy/cmd/consoleproxy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build consoleproxy:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	// Every test's processes and fake VMMs are reaped by its cleanups.
	if err := goleak.Find(); code == 0 && err != nil {
		fmt.Fprintln(os.Stderr, "goroutines leaked:", err)
		code = 1
	}
	os.Exit(code)
}

// need skips the test when a program it drives is not installed.
func need(t *testing.T, programs ...string) {
	t.Helper()
	for _, p := range programs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed (apt-get install socat netcat-openbsd); .ci/run installs it", p)
		}
	}
}

// proc is a process the test started; it is killed at cleanup.
type proc struct {
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{}
	err    error
}

// syncBuffer is a bytes.Buffer safe for a process's writes and the test's
// reads at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func start(t *testing.T, stdin io.Reader, name string, args ...string) *proc {
	t.Helper()
	return startWith(t, nil, stdin, name, args...)
}

// startWith is start with a hook to adjust the command before it starts.
func startWith(t *testing.T, adjust func(*proc), stdin io.Reader, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	p := &proc{cmd: cmd, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	if adjust != nil {
		adjust(p)
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, p.stdout, p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
	})
	return p
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(waitTimeout):
		t.Fatalf("%s did not exit; stderr:\n%s", p.cmd.Path, p.stderr)
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("%s: %v", p.cmd.Path, p.err)
	return -1
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// vmm is a minimal VMM console socket: it prints a boot log to its client
// and answers "uname -a" typed into it.
type vmm struct {
	ln   net.Listener
	mu   sync.Mutex
	conn net.Conn
}

func startVMM(t *testing.T, path string) *vmm {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	v := &vmm{ln: ln}
	var wg sync.WaitGroup
	wg.Go(func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		v.mu.Lock()
		v.conn = conn
		v.mu.Unlock()
		conn.Write([]byte("Linux version 6.1.0 (boot log)\nguest login: "))
		var line []byte
		buf := make([]byte, 64)
		for {
			n, err := conn.Read(buf)
			for _, c := range buf[:n] {
				if c != '\n' && c != '\r' {
					line = append(line, c)
					continue
				}
				if string(line) == "uname -a" {
					conn.Write([]byte("\r\nLinux guest 6.1.0 x86_64 GNU/Linux\r\n"))
				}
				line = line[:0]
			}
			if err != nil {
				return
			}
		}
	})
	t.Cleanup(func() {
		ln.Close()
		v.mu.Lock()
		if v.conn != nil {
			v.conn.Close()
		}
		v.mu.Unlock()
		wg.Wait()
	})
	return v
}

// write sends b to the proxy, once it is connected.
func (v *vmm) write(t *testing.T, b []byte) {
	t.Helper()
	var conn net.Conn
	waitFor(t, "the proxy to connect to the VMM", func() bool {
		v.mu.Lock()
		defer v.mu.Unlock()
		conn = v.conn
		return conn != nil
	})
	if _, err := conn.Write(b); err != nil {
		t.Fatalf("VMM write: %v", err)
	}
}

// send writes b to the connected proxy; for goroutines, which may not
// call t.Fatal.
func (v *vmm) send(b []byte) error {
	v.mu.Lock()
	conn := v.conn
	v.mu.Unlock()
	if conn == nil {
		return fmt.Errorf("no connection")
	}
	_, err := conn.Write(b)
	return err
}

// startProxy runs the real binary against a fresh VMM socket and returns
// the client socket's path once the proxy is attached.
func startProxy(t *testing.T, extra ...string) (sock string, daemon *proc) {
	t.Helper()
	sock, daemon, _ = startProxyIn(t, t.TempDir(), extra...)
	return sock, daemon
}

// startProxyIn is startProxy with the sockets in dir; it also returns the
// VMM.
func startProxyIn(t *testing.T, dir string, extra ...string) (sock string, daemon *proc, v *vmm) {
	t.Helper()
	vmmPath, sock := filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "console.sock")
	v = startVMM(t, vmmPath)
	args := append([]string{"--upstream", "unix:" + vmmPath, "--listen", sock, "--log-level", "debug"}, extra...)
	daemon = start(t, nil, binary, args...)
	waitFor(t, "the proxy to attach", func() bool { return strings.Contains(daemon.stderr.String(), "upstream connected") })
	return sock, daemon, v
}

const replay = "[consoleproxy] upstream connected\r\nLinux version 6.1.0 (boot log)\nguest login: "

func TestSocatReceivesReplay(t *testing.T) {
	need(t, "socat")
	sock, _ := startProxy(t)
	// socat ends at its input's EOF after -t seconds: long enough to read
	// the replay, which the proxy sends at once.
	p := start(t, strings.NewReader(""), "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
	if code := p.wait(t); code != 0 {
		t.Fatalf("socat exit %d: %s", code, p.stderr)
	}
	if got := p.stdout.String(); got != replay {
		t.Errorf("socat received %q, want %q", got, replay)
	}
}

func TestNetcatReceivesReplay(t *testing.T) {
	need(t, "nc")
	sock, _ := startProxy(t)
	p := start(t, nil, "nc", "-U", sock)
	waitFor(t, "nc to receive the replay", func() bool { return p.stdout.String() == replay })
}

func TestNetcatHalfCloseGetsTheAnswer(t *testing.T) {
	need(t, "nc")
	sock, _ := startProxy(t, "--replay", "none")
	// nc -N shuts down its writing side at the end of its input and keeps
	// reading: the proxy must keep sending until nc closes.
	p := start(t, strings.NewReader("uname -a\n"), "nc", "-N", "-U", sock)
	waitFor(t, "the answer", func() bool { return strings.Contains(p.stdout.String(), "Linux guest 6.1.0") })
}

func TestSocatTypesIntoTheVM(t *testing.T) {
	need(t, "socat")
	sock, daemon := startProxy(t, "--replay", "none")
	viewer := start(t, nil, "socat", "-u", "UNIX-CONNECT:"+sock, "-")
	// With no replay, the viewer sees the answer only if it is attached
	// before the typist types.
	waitFor(t, "the viewer to attach", func() bool { return strings.Contains(daemon.stderr.String(), "client connected") })
	typist := start(t, strings.NewReader("uname -a\n"), "socat", "-t", "2", "-", "UNIX-CONNECT:"+sock)
	waitFor(t, "the typist to see the answer", func() bool { return strings.Contains(typist.stdout.String(), "Linux guest 6.1.0") })
	waitFor(t, "the viewer to see the answer", func() bool { return strings.Contains(viewer.stdout.String(), "Linux guest 6.1.0") })
}

func TestSIGTERMCleanStop(t *testing.T) {
	sock, daemon := startProxy(t)
	daemon.cmd.Process.Signal(syscall.SIGTERM)
	if code := daemon.wait(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM: %s", code, daemon.stderr)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("socket file left behind")
	}
}
