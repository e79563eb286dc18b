package proxy

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/upstream"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// openPTY returns a new PTY's master, pollable so reads honour deadlines,
// and its slave's path.
func openPTY(t *testing.T) (*os.File, string) {
	t.Helper()
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Skipf("no PTYs here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	m := os.NewFile(uintptr(fd), "ptmx")
	t.Cleanup(func() { m.Close() })
	return m, fmt.Sprintf("/dev/pts/%d", n)
}

// relink points link at target atomically, as a VMM wrapper that exposes a
// stable name for a changing PTY does.
func relink(t *testing.T, target, link string) {
	t.Helper()
	tmp := link + ".tmp"
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

func readMaster(t *testing.T, m *os.File, want string) {
	t.Helper()
	m.SetReadDeadline(time.Now().Add(waitTimeout))
	var got []byte
	buf := make([]byte, 256)
	for !bytes.Contains(got, []byte(want)) {
		n, err := m.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("PTY master read %q: %v; want %q", got, err, want)
		}
	}
}

func TestPTYUpstream(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	link := filepath.Join(dir, "console")
	master, slave := openPTY(t)
	relink(t, slave, link)
	p, _ := startProxy(t, Config{Upstream: &PTYUpstream{Path: link}})
	// Write only once the proxy has the PTY open: bytes that reach a PTY
	// before anyone set raw mode are cooked (CR becomes LF). Real VMMs set
	// raw mode themselves; the test relies on the proxy's.
	waitFor(t, "the proxy to open the PTY", func() bool { return p.ringEnd() == uint64(len(connectedNotice)) })
	if _, err := master.Write([]byte("boot on pty\r\n")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the boot output", func() bool { return p.ringEnd() >= uint64(len(connectedNotice)+len("boot on pty\r\n")) })
	a, b := dial(t, p), dial(t, p)
	for _, c := range []net.Conn{a, b} {
		want := string(connectedNotice) + "boot on pty\r\n"
		if got := readN(t, c, nil, len(want)); string(got) != want {
			t.Errorf("replay %q, want %q", got, want)
		}
	}
	// Raw mode: CR, LF and ^C pass untranslated and raise no signal.
	a.Write([]byte("ls\r\n\x03"))
	readMaster(t, master, "ls\r\n\x03")

	master.Close()
	lost := "[consoleproxy] upstream lost: EOF\r\n" // a hung-up tty reads as EOF
	readUntil(t, b, nil, "the lost notice", func(got []byte) bool { return bytes.Contains(got, []byte(lost)) })

	master2, slave2 := openPTY(t)
	before := p.ringEnd()
	relink(t, slave2, link)
	waitFor(t, "the proxy to reopen the PTY", func() bool { return p.ringEnd() == before+uint64(len(connectedNotice)) })
	master2.Write([]byte("second boot\r\n"))
	got := readUntil(t, a, nil, "the second boot", func(got []byte) bool { return bytes.Contains(got, []byte("second boot\r\n")) })
	if want := lost + string(connectedNotice) + "second boot\r\n"; !bytes.HasSuffix(got, []byte(want)) {
		t.Errorf("after reopening got %q, want it to end %q", got, want)
	}
}

func TestListenUpstreamServesOneVMMAtATime(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	up := &ListenUpstream{Path: filepath.Join(dir, "vmm.sock")}
	if err := up.Listen(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(up.Path)
	if err != nil || fi.Mode().Perm() != unixsock.DefaultSocketMode {
		t.Fatalf("listen socket: %v, mode %v", err, fi.Mode().Perm())
	}
	p, _ := startProxy(t, Config{Upstream: up})
	conn := dial(t, p)

	first, err := net.Dial("unix", up.Path)
	if err != nil {
		t.Fatal(err)
	}
	first.Write([]byte("first VMM\n"))
	readUntil(t, conn, nil, "the first VMM", func(b []byte) bool { return bytes.Contains(b, []byte("first VMM\n")) })

	// A second VMM connects while the first is still there: it is not
	// served, so its output does not appear, until the first closes.
	second, err := net.Dial("unix", up.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.Write([]byte("second VMM\n"))
	first.Write([]byte("first again\n"))
	got := readUntil(t, conn, nil, "the first VMM again", func(b []byte) bool { return bytes.Contains(b, []byte("first again\n")) })
	if bytes.Contains(got, []byte("second")) {
		t.Fatalf("the second VMM was served while the first was connected: %q", got)
	}
	first.Close()
	got = readUntil(t, conn, got, "the second VMM", func(b []byte) bool { return bytes.Contains(b, []byte("second VMM\n")) })
	want := "[consoleproxy] upstream lost: EOF\r\n" + string(connectedNotice) + "second VMM\n"
	if !bytes.HasSuffix(got, []byte(want)) {
		t.Errorf("got %q, want it to end %q", got, want)
	}
	second.Close()
	readUntil(t, conn, got, "the second lost notice", func(b []byte) bool { return bytes.Count(b, []byte("lost: EOF")) == 2 })

	// The VMM can dial again after both left.
	third, err := net.Dial("unix", up.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	third.Write([]byte("third\n"))
	readUntil(t, conn, nil, "the third VMM", func(b []byte) bool { return bytes.Contains(b, []byte("third\n")) })
}

func TestTCPUpstream(t *testing.T) {
	checkLeaks(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	p, _ := startProxy(t, Config{Upstream: &TCPUpstream{Address: l.Addr().String()}})
	vmm, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer vmm.Close()
	vmm.Write([]byte("over tcp\n"))
	conn := dial(t, p)
	readUntil(t, conn, nil, "the output", func(b []byte) bool { return bytes.Contains(b, []byte("over tcp\n")) })
	conn.Write([]byte("input\n"))
	buf := make([]byte, 6)
	vmm.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := vmm.Read(buf); err != nil || string(buf) != "input\n" {
		t.Errorf("VMM read %q, %v", buf, err)
	}
}

func TestAttachesWhenTheSocketDirectoryAppearsLater(t *testing.T) {
	checkLeaks(t)
	dir := t.TempDir()
	deep := filepath.Join(dir, "run", "vm1", "serial")
	p, _ := startProxy(t, Config{Upstream: &UnixUpstream{Path: filepath.Join(deep, "vmm.sock")}})
	conn := dial(t, p)
	// Each level appears separately, so the watch has to move down.
	for _, d := range []string{filepath.Join(dir, "run"), filepath.Join(dir, "run", "vm1"), deep} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "one inotify instance while the upstream is down", func() bool { return inotifyInstances(t) == 1 })
	vmm := startVMM(t, filepath.Join(deep, "vmm.sock"))
	waitFor(t, "the proxy to attach", func() bool { return vmm.Accepted() == 1 })
	// A connected proxy holds no inotify instance: they are few per user.
	waitFor(t, "the inotify instance to be released", func() bool { return inotifyInstances(t) == 0 })
	vmm.Write([]byte("hello\n"))
	readUntil(t, conn, nil, "output", func(b []byte) bool { return bytes.Contains(b, []byte("hello\n")) })

	// The directory goes away with the VM and comes back: the watch moves up
	// and down again.
	vmm.Kill()
	if err := os.RemoveAll(filepath.Join(dir, "run")); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(deep, 0o755)
	vmm2 := startVMM(t, filepath.Join(deep, "vmm.sock"))
	waitFor(t, "the proxy to reattach", func() bool { return vmm2.Accepted() == 1 })
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

// syncLog collects a logger's output for assertions.
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

func TestTakeoverIsNotFought(t *testing.T) {
	checkLeaks(t)
	logs := &syncLog{}
	p, dir := startProxy(t, Config{Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info, TimeFormat: time.RFC3339Nano})})
	_ = p
	vmm := startVMM(t, filepath.Join(dir, "vmm.sock"))
	waitFor(t, "the proxy to attach", func() bool { return vmm.Accepted() == 1 })

	// Someone connects to the VMM directly whenever the proxy has the
	// console, kicking it off each time (the newest connection wins).
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	var direct int
	var mu sync.Mutex
	wg.Go(func() {
		seen := 0
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for ctx.Err() == nil {
			if n := vmm.Accepted(); n > seen+1 || seen == 0 {
				c, err := net.Dial("unix", vmm.path)
				if err != nil {
					return
				}
				conns = append(conns, c)
				seen = vmm.Accepted()
				mu.Lock()
				direct++
				mu.Unlock()
			}
			time.Sleep(time.Millisecond)
		}
	})
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		time.Sleep(10 * time.Millisecond) // the scenario runs for two seconds
	}
	cancel()
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	mu.Lock()
	proxyConns := vmm.Accepted() - direct
	mu.Unlock()
	if limit := int(4*elapsed) + 2; proxyConns > limit {
		t.Errorf("the proxy connected %d times in %.1fs while being taken over, more than %d", proxyConns, elapsed, limit)
	}
	if !strings.Contains(logs.String(), "took the console over") {
		t.Errorf("no takeover warning in the log:\n%s", logs)
	}
	// Each reconnect after a takeover waits at least upstream.TakeoverBackoff: the
	// proxy's own connect log lines are never closer than that. (Plain
	// exponential backoff would reconnect after 10, 20, 40 ms.)
	var connects []time.Time
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "upstream connected") {
			at, err := time.Parse(time.RFC3339Nano, strings.Fields(line)[0])
			if err != nil {
				t.Fatalf("log line %q: %v", line, err)
			}
			connects = append(connects, at)
		}
	}
	if len(connects) < 2 {
		t.Fatalf("only %d connects in the log: the scenario did not run", len(connects))
	}
	for i := 1; i < len(connects); i++ {
		if gap := connects[i].Sub(connects[i-1]); gap < upstream.TakeoverBackoff {
			t.Errorf("reconnect %d came %v after the previous one, sooner than %v; log:\n%s", i, gap, upstream.TakeoverBackoff, logs)
		}
	}
}

func TestExitWithUpstreamForEveryKind(t *testing.T) {
	checkLeaks(t)
	t.Run("listen", func(t *testing.T) {
		up := &ListenUpstream{Path: filepath.Join(t.TempDir(), "vmm.sock")}
		if err := up.Listen(); err != nil {
			t.Fatal(err)
		}
		p, err := New(Config{Upstream: up, ExitWithUpstream: true})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- p.RunUpstream(context.Background()) }()
		c, err := net.Dial("unix", up.Path)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if err := <-done; err != nil {
			t.Errorf("RunUpstream = %v", err)
		}
		if _, err := os.Stat(up.Path); !os.IsNotExist(err) {
			t.Errorf("listen socket left behind: %v", err)
		}
	})
	t.Run("pty", func(t *testing.T) {
		master, slave := openPTY(t)
		p, err := New(Config{Upstream: &PTYUpstream{Path: slave}, ExitWithUpstream: true})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- p.RunUpstream(context.Background()) }()
		r, _ := p.NewReader()
		defer r.Close()
		buf := make([]byte, 64)
		if n, err := r.Read(buf); err != nil || !bytes.Contains(buf[:n], []byte("connected")) {
			t.Fatalf("Read = %q, %v", buf[:n], err)
		}
		master.Close() // hang-up
		if err := <-done; err != nil {
			t.Errorf("RunUpstream = %v", err)
		}
	})
}

func TestACrashLoopingVMMIsNotATakeover(t *testing.T) {
	checkLeaks(t)
	logs := &syncLog{}
	p, dir := startProxy(t, Config{Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	path := filepath.Join(dir, "vmm.sock")
	// A VMM that crashes right after the proxy attaches and comes back,
	// five times: its socket goes and a new one comes each time.
	for i := range 5 {
		vmm := startVMM(t, path)
		waitFor(t, "the proxy to attach", func() bool { return vmm.Accepted() == 1 })
		waitFor(t, "the connected notice", func() bool { return p.Stats().UpstreamConnects == uint64(i+1) })
		vmm.Kill()
	}
	if strings.Contains(logs.String(), "took the console over") {
		t.Errorf("a VMM restart was taken for a takeover:\n%s", logs)
	}
}

func TestNeverConnectsToItsOwnSocket(t *testing.T) {
	checkLeaks(t)
	logs := &syncLog{}
	dir := t.TempDir()
	vmmPath := filepath.Join(dir, "vmm.sock")
	// The upstream's path leads to the proxy's own client socket, by
	// another name than its own.
	if err := os.Symlink("console.sock", vmmPath); err != nil {
		t.Fatal(err)
	}
	p, _ := startProxyIn(t, dir, Config{Upstream: &UnixUpstream{Path: vmmPath}, Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	waitFor(t, "the refusal", func() bool { return strings.Contains(logs.String(), "own sockets") })
	if n := p.Stats().UpstreamConnects; n != 0 {
		t.Fatalf("the proxy connected to itself %d times", n)
	}
	os.Remove(vmmPath)
	vmm := startVMM(t, vmmPath)
	waitFor(t, "the real VMM", func() bool { return vmm.Accepted() == 1 })
}
