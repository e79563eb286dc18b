package console

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/logsink"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/watch"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// gate holds every write of the console log until it is opened, as a slow
// disk would.
type gate struct {
	open chan struct{}
	once sync.Once
}

func TestStopDrainsTheLogLast(t *testing.T) {
	dir := t.TempDir()
	vmmPath := filepath.Join(dir, "vmm.sock")
	ln, err := net.Listen("unix", vmmPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	logPath := filepath.Join(dir, "console.log")
	var written bytes.Buffer
	g := &gate{open: make(chan struct{})}
	entered := make(chan struct{}, 1)
	c, err := Open(Config{
		Upstream:   &proxy.UnixUpstream{Path: vmmPath},
		Listen:     filepath.Join(dir, "console.sock"),
		ConsoleLog: logPath,
		LogOptions: logsink.Options{Seam: func(f *os.File) io.Writer {
			return writerFunc(func(p []byte) (int, error) {
				select {
				case entered <- struct{}{}:
				default:
				}
				<-g.open
				return written.Write(p)
			})
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	vmm, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	client, err := net.Dial("unix", filepath.Join(dir, "console.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// The log writer is held in its first write (the connected notice);
	// the VM's last words come after, and the client receives them.
	<-entered
	last := "[consoleproxy] upstream connected\r\nthe VM's last words\n"
	vmm.Write([]byte("the VM's last words\n"))
	client.SetReadDeadline(time.Now().Add(20 * time.Second))
	got := make([]byte, len(last))
	if _, err := io.ReadFull(client, got); err != nil || string(got) != last {
		t.Fatalf("client received %q, %v", got, err)
	}
	// Stop while the log writer is behind; the disk comes back only once
	// the clients have been stopped (their socket removed), as a slow disk
	// would.
	cancel()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Lstat(filepath.Join(dir, "console.sock")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the clients were not stopped")
		}
		time.Sleep(time.Millisecond)
	}
	g.once.Do(func() { close(g.open) })
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	vmm.Close()
	if !strings.Contains(written.String(), "the VM's last words\n") {
		t.Errorf("the log holds %q: the stop did not wait for it", written.String())
	}
	if _, err := os.Lstat(filepath.Join(dir, "console.sock")); err == nil {
		t.Error("the client socket is still there after Run")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func TestOpenFailureLeavesNothingBehind(t *testing.T) {
	dir := t.TempDir()
	listen := filepath.Join(dir, "console.sock")
	ro := filepath.Join(dir, "view.sock")
	if err := os.WriteFile(ro, nil, 0o644); err != nil { // in the way
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "console.log")
	_, err := Open(Config{
		Upstream:   &proxy.UnixUpstream{Path: filepath.Join(dir, "vmm.sock")},
		Listen:     listen,
		ListenRO:   ro,
		ConsoleLog: logPath,
	})
	if err == nil || !strings.Contains(err.Error(), "--listen-ro") {
		t.Fatalf("Open: %v, want a --listen-ro error", err)
	}
	if _, err := os.Lstat(listen); err == nil {
		t.Error("the read-write socket was left behind")
	}
}

func TestARemovedClientSocketIsCreatedAgain(t *testing.T) {
	dir := t.TempDir()
	w := watch.New()
	defer w.Close()
	sock := filepath.Join(dir, "console.sock")
	c, err := Open(Config{Upstream: &proxy.UnixUpstream{Path: filepath.Join(dir, "vmm.sock")}, Listen: sock, Watcher: w, KeepSockets: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var stopOnce sync.Once
	var runErr error
	stop := func() {
		stopOnce.Do(func() {
			cancel()
			runErr = <-done
		})
	}
	defer stop()
	waitDial := func() {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			conn, err := net.Dial("unix", sock)
			if err == nil {
				conn.Close()
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the client socket is not served: %v", err)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	waitDial()
	for range 2 { // each time
		if err := os.Remove(sock); err != nil {
			t.Fatal(err)
		}
		waitDial()
	}
	stop()
	if runErr != nil {
		t.Errorf("Run: %v", runErr)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("the socket created again was left behind at the stop")
	}
}
