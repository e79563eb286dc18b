package host

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/console"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"
)

const waitTimeout = 20 * time.Second

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

type syncLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncLog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncLog) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// vm is a fake VMM's console socket in its own directory: one client at a
// time; its socket file goes with it.
type vm struct {
	dir, sock string
	ln        net.Listener
	wg        sync.WaitGroup
	mu        sync.Mutex
	conn      net.Conn
	in        bytes.Buffer
}

func startVM(t *testing.T, parent, name string) *vm {
	t.Helper()
	dir := filepath.Join(parent, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	v := &vm{dir: dir, sock: filepath.Join(dir, "serial.sock")}
	ln, err := net.Listen("unix", v.sock)
	if err != nil {
		t.Fatal(err)
	}
	v.ln = ln
	v.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			v.mu.Lock()
			if v.conn != nil {
				v.conn.Close()
			}
			v.conn = c
			v.mu.Unlock()
			c.Write([]byte("boot of " + name + "\n"))
			v.wg.Go(func() {
				buf := make([]byte, 256)
				for {
					n, err := c.Read(buf)
					v.mu.Lock()
					v.in.Write(buf[:n])
					v.mu.Unlock()
					if err != nil {
						return
					}
				}
			})
		}
	})
	t.Cleanup(v.kill)
	return v
}

func (v *vm) connected() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.conn != nil
}

func (v *vm) input() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.in.String()
}

func (v *vm) write(t *testing.T, s string) {
	t.Helper()
	v.mu.Lock()
	c := v.conn
	v.mu.Unlock()
	if _, err := c.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

// kill ends the VMM: its socket file goes, and its connection closes.
func (v *vm) kill() {
	v.ln.Close()
	v.mu.Lock()
	if v.conn != nil {
		v.conn.Close()
		v.conn = nil
	}
	v.mu.Unlock()
	v.wg.Wait()
}

type testHost struct {
	*Host
	parent string
	logs   *syncLog
}

// startHost runs a host for parent/*/serial.sock, with client sockets at
// {dir}/console.sock.
func startHost(t *testing.T, parent string, adjust func(*Config)) *testHost {
	t.Helper()
	p, err := ParsePattern(filepath.Join(parent, "*", "serial.sock"))
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncLog{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})
	w := watch.New()
	cfg := Config{
		Pattern: p,
		Console: func(name, path string) (console.Config, error) {
			return console.Config{
				Name:     name,
				Upstream: &proxy.UnixUpstream{Path: path},
				Listen:   Expand("{dir}/console.sock", name, path),
				Watcher:  w,
				Logger:   log.With("console", name),
			}, nil
		},
		Watcher: w,
		Logger:  log,
	}
	if adjust != nil {
		adjust(&cfg)
	}
	h := New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		w.Close()
	})
	return &testHost{Host: h, parent: parent, logs: logs}
}

func (h *testHost) names() []string {
	var names []string
	for _, c := range h.Consoles() {
		names = append(names, c.Name())
	}
	return names
}

// attachClient connects to a console's client socket once it listens and
// reads until the replay holds want.
func attachClient(t *testing.T, sock, want string) net.Conn {
	t.Helper()
	var c net.Conn
	waitFor(t, "the client socket "+sock, func() bool {
		var err error
		c, err = net.Dial("unix", sock)
		return err == nil
	})
	t.Cleanup(func() { c.Close() })
	readUntil(t, c, want)
	return c
}

func readUntil(t *testing.T, c net.Conn, want string) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	var got []byte
	buf := make([]byte, 4096)
	for !strings.Contains(string(got), want) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("waiting for %q: %v; received %q", want, err, got)
		}
	}
	return string(got)
}

func TestConsolesAppearAsTheirVMsDo(t *testing.T) {
	parent := t.TempDir()
	a := startVM(t, parent, "a")
	h := startHost(t, parent, nil)
	b := startVM(t, parent, "b") // after the host started
	waitFor(t, "both VMs to be attached", func() bool { return a.connected() && b.connected() })

	ca := attachClient(t, filepath.Join(a.dir, "console.sock"), "boot of a\n")
	cb := attachClient(t, filepath.Join(b.dir, "console.sock"), "boot of b\n")
	ca.Write([]byte("typed into a\n"))
	cb.Write([]byte("typed into b\n"))
	waitFor(t, "the input", func() bool { return a.input() == "typed into a\n" && b.input() == "typed into b\n" })
	if got := strings.Join(h.names(), ","); got != "a,b" {
		t.Errorf("consoles %q, want a,b", got)
	}
	// One inotify instance for the whole host, whatever the consoles.
	if n := inotifyInstances(t); n != 1 {
		t.Errorf("%d inotify instances, want 1", n)
	}
}

func TestParentCreatedLater(t *testing.T) {
	base := t.TempDir()
	parent := filepath.Join(base, "run", "vms")
	startHost(t, parent, nil)
	v := startVM(t, parent, "late")
	waitFor(t, "the VM to be attached", v.connected)
}

func TestRestartWithinRetireAfterKeepsClients(t *testing.T) {
	parent := t.TempDir()
	v := startVM(t, parent, "vm")
	h := startHost(t, parent, func(c *Config) { c.RetireAfter = time.Hour })
	c := attachClient(t, filepath.Join(v.dir, "console.sock"), "boot of vm\n")
	v.kill()
	readUntil(t, c, "[consoleproxy] upstream lost: EOF\r\n")
	v2 := startVM(t, parent, "vm")
	got := readUntil(t, c, "boot of vm\n")
	if !strings.HasPrefix(got, "[consoleproxy] upstream connected\r\n") {
		t.Errorf("after the restart the client received %q", got)
	}
	waitFor(t, "the VM to be attached again", v2.connected)
	if got := h.names(); len(got) != 1 {
		t.Errorf("consoles %q, want the one", got)
	}
}

func TestMissingLongerThanRetireAfterRetires(t *testing.T) {
	parent := t.TempDir()
	v := startVM(t, parent, "vm")
	h := startHost(t, parent, func(c *Config) { c.RetireAfter = 100 * time.Millisecond })
	sock := filepath.Join(v.dir, "console.sock")
	c := attachClient(t, sock, "boot of vm\n")
	v.kill()
	got := readUntil(t, c, "[consoleproxy] console retired\r\n")
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("after the notice: %v, want EOF", err)
	}
	if !strings.HasSuffix(got, "[consoleproxy] upstream lost: EOF\r\n[consoleproxy] console retired\r\n") {
		t.Errorf("the client received %q", got)
	}
	waitFor(t, "the console to go", func() bool { return len(h.names()) == 0 })
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the retired console's socket is still there: %v", err)
	}
	// The same name later starts anew.
	v2 := startVM(t, parent, "vm")
	waitFor(t, "the new console", v2.connected)
}

func TestRemovedDirectoryRetiresAtOnce(t *testing.T) {
	parent := t.TempDir()
	v := startVM(t, parent, "vm")
	other := startVM(t, parent, "other")
	h := startHost(t, parent, func(c *Config) { c.RetireAfter = time.Hour })
	c := attachClient(t, filepath.Join(v.dir, "console.sock"), "boot of vm\n")
	co := attachClient(t, filepath.Join(other.dir, "console.sock"), "boot of other\n")
	// rm -rf of the VM's directory while its VMM is still connected.
	start := time.Now()
	if err := os.RemoveAll(v.dir); err != nil {
		t.Fatal(err)
	}
	readUntil(t, c, "[consoleproxy] console retired\r\n")
	if took := time.Since(start); took > time.Second {
		t.Errorf("retired %v after its directory went, want within a second", took)
	}
	waitFor(t, "the console to go", func() bool { return strings.Join(h.names(), ",") == "other" })
	other.write(t, "still here\n")
	readUntil(t, co, "still here\n")
}

func TestConsoleThatCannotStartIsSkippedAndRetried(t *testing.T) {
	parent := t.TempDir()
	good := startVM(t, parent, "good")
	bad := startVM(t, parent, "bad")
	inTheWay := filepath.Join(bad.dir, "console.sock")
	if err := os.WriteFile(inTheWay, []byte("not a socket"), 0o644); err != nil {
		t.Fatal(err)
	}
	h := startHost(t, parent, nil)
	waitFor(t, "the good console", good.connected)
	waitFor(t, "the failure to be logged", func() bool { return strings.Contains(h.logs.String(), "console cannot start") })
	if logs := h.logs.String(); !strings.Contains(logs, "console=bad") || strings.Count(logs, "console cannot start") != 1 {
		t.Errorf("want one line naming the console:\n%s", logs)
	}
	if got := h.names(); strings.Join(got, ",") != "good" {
		t.Errorf("consoles %q, want good", got)
	}
	// Removing what was in the way changes its directory: tried again.
	if err := os.Remove(inTheWay); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the console to start once nothing is in its way", bad.connected)
}

func TestMaxConsolesFirstComeFirstServed(t *testing.T) {
	parent := t.TempDir()
	h := startHost(t, parent, func(c *Config) { c.MaxConsoles = 2; c.RetireAfter = 50 * time.Millisecond })
	a := startVM(t, parent, "a")
	waitFor(t, "a", a.connected)
	b := startVM(t, parent, "b")
	waitFor(t, "b", b.connected)
	c := startVM(t, parent, "c")
	waitFor(t, "the cap to be logged", func() bool { return strings.Contains(h.logs.String(), "too many consoles") })
	if c.connected() {
		t.Fatal("a third console started with --max-consoles 2")
	}
	a.kill()
	waitFor(t, "the third console once one retired", c.connected)
	if got := strings.Join(h.names(), ","); got != "b,c" {
		t.Errorf("consoles %q, want b,c", got)
	}
}

// inotifyInstances counts the inotify instances this process holds.
func inotifyInstances(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && target == "anon_inode:inotify" {
			n++
		}
	}
	return n
}

func TestStopStopsEveryConsoleAtOnce(t *testing.T) {
	parent := t.TempDir()
	const n = 5
	var vms []*vm
	for i := range n {
		vms = append(vms, startVM(t, parent, string(rune('a'+i))))
	}
	p, err := ParsePattern(filepath.Join(parent, "*", "serial.sock"))
	if err != nil {
		t.Fatal(err)
	}
	w := watch.New()
	defer w.Close()
	h := New(Config{Pattern: p, Watcher: w, Console: func(name, path string) (console.Config, error) {
		return console.Config{Name: name, Upstream: &proxy.UnixUpstream{Path: path},
			Listen: Expand("{dir}/console.sock", name, path), Watcher: w}, nil
	}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.Run(ctx)
	}()
	// Every console has a client that never reads, behind a flood: each
	// stop waits out its whole drain budget.
	for _, v := range vms {
		waitFor(t, "the VM to be attached", v.connected)
		attachClient(t, filepath.Join(v.dir, "console.sock"), "boot of")
		v.write(t, strings.Repeat("flood\n", 1<<20/6*4))
	}
	start := time.Now()
	cancel()
	<-done
	// One after another they would take n budgets.
	if took := time.Since(start); took >= (n-2)*console.DrainTimeout {
		t.Errorf("stopping %d consoles took %v: not at once", n, took)
	}
}

func TestMaxConsolesServesTheWaitingInTheOrderTheyCame(t *testing.T) {
	parent := t.TempDir()
	h := startHost(t, parent, func(c *Config) { c.MaxConsoles = 1; c.RetireAfter = 50 * time.Millisecond })
	a := startVM(t, parent, "a")
	waitFor(t, "a", a.connected)
	z := startVM(t, parent, "z")
	waitFor(t, "z to wait for a slot", func() bool { return strings.Count(h.logs.String(), "too many consoles") == 1 })
	b := startVM(t, parent, "b")
	waitFor(t, "b to wait for a slot", func() bool { return strings.Count(h.logs.String(), "too many consoles") == 2 })
	a.kill()
	waitFor(t, "the first to come to get the slot", z.connected)
	if b.connected() {
		t.Error("b, which came after z, was served too")
	}
}

func TestAConsoleThatCannotStartDoesNotRetryInALoop(t *testing.T) {
	parent := t.TempDir()
	v := startVM(t, parent, "vm")
	// Something in the way of the read-only socket: every attempt creates
	// and removes the read-write socket (events in the VM's directory).
	if err := os.WriteFile(filepath.Join(v.dir, "view.sock"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	attempts := 0
	w := watch.New()
	defer w.Close()
	p, _ := ParsePattern(filepath.Join(parent, "*", "serial.sock"))
	h := New(Config{Pattern: p, Watcher: w, Console: func(name, path string) (console.Config, error) {
		mu.Lock()
		attempts++
		mu.Unlock()
		return console.Config{Name: name, Upstream: &proxy.UnixUpstream{Path: path}, Watcher: w,
			Listen: Expand("{dir}/console.sock", name, path), ListenRO: Expand("{dir}/view.sock", name, path)}, nil
	}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.Run(ctx)
	}()
	defer func() { cancel(); <-done }()
	waitFor(t, "the first attempt", func() bool { mu.Lock(); defer mu.Unlock(); return attempts > 0 })
	// A second and a third come on the backoff timer, no sooner.
	<-time.After(retryMin + retryMin/2)
	mu.Lock()
	defer mu.Unlock()
	if attempts > 3 {
		t.Errorf("%d attempts in %v, want at most 3: a failed start retries on its own traces", attempts, retryMin+retryMin/2)
	}
}

func TestADirectoryReplacedQuicklyIsStillWatched(t *testing.T) {
	parent := t.TempDir()
	v := startVM(t, parent, "vm")
	h := startHost(t, parent, func(c *Config) { c.RetireAfter = 300 * time.Millisecond })
	c := attachClient(t, filepath.Join(v.dir, "console.sock"), "boot of vm\n")
	// The VM restarts in a new directory of the same name, at once.
	v.kill()
	if err := os.RemoveAll(v.dir); err != nil {
		t.Fatal(err)
	}
	readUntil(t, c, "[consoleproxy] console retired\r\n") // its socket directory went
	v2 := startVM(t, parent, "vm")
	waitFor(t, "the new console", v2.connected)
	c2 := attachClient(t, filepath.Join(v2.dir, "console.sock"), "boot of vm\n")
	// Past RetireAfter, the new console is still there and streaming.
	<-time.After(600 * time.Millisecond)
	v2.write(t, "still here\n")
	readUntil(t, c2, "still here\n")
	if got := h.names(); len(got) != 1 {
		t.Errorf("consoles %q", got)
	}
}

func TestTheProxysOwnSocketsAreNeverConsoles(t *testing.T) {
	parent := t.TempDir()
	p, err := ParsePattern(filepath.Join(parent, "*.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(parent, "a.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	logs := &syncLog{}
	w := watch.New()
	defer w.Close()
	// Each console's client socket matches the pattern too (the flags
	// refuse this; the host must not depend on them).
	h := New(Config{Pattern: p, Watcher: w, Logger: hclog.New(&hclog.LoggerOptions{Output: logs}),
		Console: func(name, path string) (console.Config, error) {
			return console.Config{Name: name, Upstream: &proxy.UnixUpstream{Path: path}, Watcher: w,
				Listen: filepath.Join(parent, name+"-c.sock")}, nil
		}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.Run(ctx)
	}()
	defer func() { cancel(); <-done }()
	waitFor(t, "the own socket to be recognised", func() bool { return strings.Contains(logs.String(), "one of the proxy's own sockets") })
	if got := consoleNames(h); got != "a" {
		t.Errorf("consoles %q, want only a", got)
	}
}

func consoleNames(h *Host) string {
	var names []string
	for _, c := range h.Consoles() {
		names = append(names, c.Name())
	}
	return strings.Join(names, ",")
}
