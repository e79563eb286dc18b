package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// binary is the consoleproxy built for this run by TestMain.
var binary string

func TestMain(m *testing.M) { Main(m, true, &binary) }

// vmm is a minimal VMM console socket: it prints a boot log to its client
// and answers "uname -a" typed into it.
type vmm struct {
	ln   net.Listener
	mu   sync.Mutex
	conn net.Conn
	in   []byte // every byte received
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
			v.mu.Lock()
			v.in = append(v.in, buf[:n]...)
			v.mu.Unlock()
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

// input returns every byte the VMM has received.
func (v *vmm) input() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return string(v.in)
}

// write sends b to the proxy, once it is connected.
func (v *vmm) write(t *testing.T, b []byte) {
	t.Helper()
	var conn net.Conn
	WaitFor(t, "the proxy to connect to the VMM", func() bool {
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
func startProxy(t *testing.T, extra ...string) (sock string, daemon *Proc) {
	t.Helper()
	sock, daemon, _ = startProxyIn(t, t.TempDir(), extra...)
	return sock, daemon
}

// startProxyIn is startProxy with the sockets in dir; it also returns the
// VMM.
func startProxyIn(t *testing.T, dir string, extra ...string) (sock string, daemon *Proc, v *vmm) {
	t.Helper()
	vmmPath, sock := filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "console.sock")
	v = startVMM(t, vmmPath)
	args := append([]string{"--upstream", "unix:" + vmmPath, "--listen", sock, "--log-level", "debug"}, extra...)
	daemon = Start(t, nil, binary, args...)
	WaitFor(t, "the proxy to attach", func() bool { return strings.Contains(daemon.Stderr.String(), "upstream connected") })
	return sock, daemon, v
}

const replay = "[consoleproxy] upstream connected\r\nLinux version 6.1.0 (boot log)\nguest login: "

func TestSocatReceivesReplay(t *testing.T) {
	Need(t, "socat")
	sock, _ := startProxy(t)
	// socat ends at its input's EOF after -t seconds: long enough to read
	// the replay, which the proxy sends at once.
	p := Start(t, strings.NewReader(""), "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
	if code := p.Wait(t); code != 0 {
		t.Fatalf("socat exit %d: %s", code, p.Stderr)
	}
	if got := p.Stdout.String(); got != replay {
		t.Errorf("socat received %q, want %q", got, replay)
	}
}

func TestNetcatReceivesReplay(t *testing.T) {
	Need(t, "nc")
	sock, _ := startProxy(t)
	p := Start(t, nil, "nc", "-U", sock)
	WaitFor(t, "nc to receive the replay", func() bool { return p.Stdout.String() == replay })
}

func TestNetcatHalfCloseGetsTheAnswer(t *testing.T) {
	Need(t, "nc")
	sock, _ := startProxy(t, "--replay", "none")
	// nc -N shuts down its writing side at the end of its input and keeps
	// reading: the proxy must keep sending until nc closes.
	p := Start(t, strings.NewReader("uname -a\n"), "nc", "-N", "-U", sock)
	WaitFor(t, "the answer", func() bool { return strings.Contains(p.Stdout.String(), "Linux guest 6.1.0") })
}

func TestSocatTypesIntoTheVM(t *testing.T) {
	Need(t, "socat")
	sock, daemon := startProxy(t, "--replay", "none")
	viewer := Start(t, nil, "socat", "-u", "UNIX-CONNECT:"+sock, "-")
	// With no replay, the viewer sees the answer only if it is attached
	// before the typist types.
	WaitFor(t, "the viewer to attach", func() bool { return strings.Contains(daemon.Stderr.String(), "client connected") })
	typist := Start(t, strings.NewReader("uname -a\n"), "socat", "-t", "2", "-", "UNIX-CONNECT:"+sock)
	WaitFor(t, "the typist to see the answer", func() bool { return strings.Contains(typist.Stdout.String(), "Linux guest 6.1.0") })
	WaitFor(t, "the viewer to see the answer", func() bool { return strings.Contains(viewer.Stdout.String(), "Linux guest 6.1.0") })
}

func TestSIGTERMCleanStop(t *testing.T) {
	sock, daemon := startProxy(t)
	daemon.Cmd.Process.Signal(syscall.SIGTERM)
	if code := daemon.Wait(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM: %s", code, daemon.Stderr)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("socket file left behind")
	}
}
