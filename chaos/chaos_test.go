package chaos

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/e2e"
)

func TestVMMRestartsKeepEveryClientAndEveryByte(t *testing.T) {
	cycles := scale(10, 100)
	const perCycle = 256 << 10
	dir := t.TempDir()
	d := startDaemon(t, dir)
	var off uint64
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	conn := v.waitConn(t)
	clients := make([]*client, 10)
	for i := range clients {
		clients[i] = attach(t, d.sock, 0)
	}
	start := time.Now()
	for cycle := range cycles {
		for sent := 0; sent < perCycle; sent += 32 << 10 {
			if _, err := conn.Write(pattern(off, 32<<10)); err != nil {
				t.Fatalf("cycle %d: VMM write: %v", cycle, err)
			}
			off += 32 << 10
		}
		// Every client has it all before the VM dies.
		for i, cl := range clients {
			e2e.WaitFor(t, fmt.Sprintf("client %d in cycle %d", i, cycle), func() bool {
				next, _, _, err, eof := cl.state()
				if err != nil || eof != nil {
					t.Fatalf("client %d: %v, %v", i, err, eof)
				}
				return next == off
			})
		}
		v.kill()
		v = startVMM(t, v.path)
		conn = v.waitConn(t)
	}
	elapsed := time.Since(start)
	for i, cl := range clients {
		// The last restart's notice follows the VMM's accept.
		e2e.WaitFor(t, fmt.Sprintf("client %d to see the last reconnect", i), func() bool {
			_, notices, _, _, _ := cl.state()
			return strings.Count(strings.Join(notices, "\n"), "upstream connected") == cycles+1
		})
		next, notices, announced, err, eof := cl.state()
		connected := strings.Count(strings.Join(notices, "\n"), "upstream connected")
		lost := strings.Count(strings.Join(notices, "\n"), "upstream lost")
		if err != nil || eof != nil || next != off || announced != 0 || connected != cycles+1 || lost != cycles {
			t.Errorf("client %d: next %d of %d, %d bytes announced lost, %d connected and %d lost notices, err %v, eof %v",
				i, next, off, announced, connected, lost, err, eof)
		}
	}
	figure(t, "%d VMM kill/restart cycles, 10 clients, %d MiB streamed: 0 client disconnects, 0 bytes lost, %d reconnect notices per client, %.1f ms per cycle",
		cycles, off>>20, cycles, float64(elapsed.Milliseconds())/float64(cycles))
}

func TestClientChurnLeavesNothingBehind(t *testing.T) {
	cycles := scale(200, 1000)
	dir := t.TempDir()
	d := startDaemon(t, dir)
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	// Enough history that a replay takes several writes.
	v.waitConn(t).Write(pattern(0, 512<<10))
	e2e.WaitFor(t, "the history", func() bool { return strings.Contains(d.Stderr.String(), "upstream connected") })
	baseG, baseFD := d.stats(t)

	kinds := []string{"read all", "close mid-replay", "half-close", "reset", "connect and leave"}
	start := time.Now()
	errs := make(chan error, 4)
	for w := range 4 {
		go func() {
			for i := w; i < cycles; i += 4 {
				if err := churnOnce(d.sock, kinds[i%len(kinds)]); err != nil {
					errs <- fmt.Errorf("cycle %d (%s): %w", i, kinds[i%len(kinds)], err)
					return
				}
			}
			errs <- nil
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	var g, fds int
	e2e.WaitFor(t, "goroutines and descriptors back to the baseline", func() bool {
		g, fds = d.stats(t)
		return g <= baseG && fds <= baseFD
	})
	figure(t, "%d connect/read/disconnect cycles (%s) in %.1fs: goroutines %d before, %d after; open descriptors %d before, %d after",
		cycles, strings.Join(kinds, ", "), elapsed.Seconds(), baseG, g, baseFD, fds)
}

func churnOnce(sock, kind string) error {
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return err
	}
	uc := conn.(*net.UnixConn)
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(e2e.WaitTimeout))
	buf := make([]byte, 64<<10)
	switch kind {
	case "read all":
		for got := 0; got < 512<<10; {
			n, err := uc.Read(buf)
			if err != nil {
				return err
			}
			got += n
		}
	case "close mid-replay":
		_, err = uc.Read(buf[:1024])
	case "half-close":
		uc.Write([]byte("\n"))
		uc.CloseWrite()
		_, err = uc.Read(buf)
	case "reset":
		// Closing with unread data makes the kernel reset the proxy's
		// writes (ECONNRESET).
		time.Sleep(time.Millisecond)
	}
	return err
}

func TestStuckAndSlowClientsAmongFastOnes(t *testing.T) {
	total := uint64(scale(32, 256)) << 20
	const ring = 1 << 20
	dir := t.TempDir()
	d := startDaemon(t, dir)
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	conn := v.waitConn(t)
	stuck, err := net.Dial("unix", d.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	var fast, slow []*client
	for range 4 {
		fast = append(fast, attach(t, d.sock, 0))
	}
	for range 2 {
		slow = append(slow, attach(t, d.sock, 2*time.Millisecond))
	}
	rssBefore := d.rssKiB(t)
	peak := rssBefore
	start := time.Now()
	for off := uint64(0); off < total; off += 64 << 10 {
		// Paced to the fast clients only: slow and stuck ones fall behind.
		for _, cl := range fast {
			e2e.WaitFor(t, "the fast clients", func() bool { next, _, _, _, _ := cl.state(); return next+ring/2 > off })
		}
		conn.Write(pattern(off, 64<<10))
		if off%(4<<20) == 0 {
			peak = max(peak, d.rssKiB(t))
		}
	}
	elapsed := time.Since(start)
	for i, cl := range fast {
		cl.reached(t, "the fast clients to finish", total)
		if _, _, announced, err, _ := cl.state(); announced != 0 || err != nil {
			t.Errorf("fast client %d: %d bytes announced lost, %v", i, announced, err)
		}
	}
	var slowLost uint64
	for i, cl := range slow {
		cl.reached(t, "the slow clients to finish", total)
		_, notices, announced, err, _ := cl.state()
		if err != nil || announced == 0 {
			t.Errorf("slow client %d: %v, %d bytes announced in %d notices", i, err, announced, len(notices))
		}
		slowLost += announced
	}
	// The stuck client finally reads: the same exactness.
	sc := &checker{}
	stuck.SetReadDeadline(time.Now().Add(e2e.WaitTimeout))
	buf := make([]byte, 64<<10)
	for sc.err == nil && sc.next < total {
		n, err := stuck.Read(buf)
		sc.write(buf[:n])
		if err != nil {
			t.Fatalf("stuck client: %v", err)
		}
	}
	if sc.err != nil || sc.announced == 0 {
		t.Errorf("stuck client: %v, %d bytes announced", sc.err, sc.announced)
	}
	rssAfter := d.rssKiB(t)
	if grew := peak - rssBefore; grew > 4<<10 {
		t.Errorf("RSS grew by %d KiB (from %d) while a client was stuck", grew, rssBefore)
	}
	figure(t, "%d MiB to 4 fast, 2 slow and 1 stuck client in %.1fs (%.0f MiB/s per fast client): fast clients lost 0 bytes; "+
		"slow clients skipped %d bytes, each gap exactly as announced; the stuck client skipped %d bytes, exactly as announced; "+
		"RSS %d KiB before, %d KiB peak, %d KiB after",
		total>>20, elapsed.Seconds(), float64(total>>20)/elapsed.Seconds(), slowLost, sc.announced, rssBefore, peak, rssAfter)
}

// mountTmpfs mounts a small tmpfs at dir, skipping where that is not
// allowed.
func mountTmpfs(t *testing.T, dir, opts string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting a tmpfs needs root; CI runs as root")
	}
	os.MkdirAll(dir, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", opts, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
}

func TestFullDiskNeitherStallsNorLosesSilently(t *testing.T) {
	dir := t.TempDir()
	logs := filepath.Join(dir, "logs")
	// Larger than the ring: after a skip the log writer resumes a ring
	// back, and that must fit once space is free again.
	mountTmpfs(t, logs, "size=4m")
	logPath := filepath.Join(logs, "console.log")
	d := startDaemon(t, dir, "--console-log", logPath, "--console-log-max-size", "0")
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	conn := v.waitConn(t)
	fast := attach(t, d.sock, 0)
	var off uint64
	send := func(n uint64) {
		for end := off + n; off < end; off += 16 << 10 {
			e2e.WaitFor(t, "the client", func() bool { next, _, _, _, _ := fast.state(); return next+512<<10 > off })
			conn.Write(pattern(off, 16<<10))
		}
	}
	send(128 << 10)
	// Fill the filesystem, as another writer would.
	filler, _ := os.Create(filepath.Join(logs, "filler"))
	filler.Write(make([]byte, 8<<20)) // fails with ENOSPC when full
	filler.Close()
	send(4 << 20) // four rings while the disk is full
	e2e.WaitFor(t, "the failure to be logged", func() bool { return strings.Contains(d.Stderr.String(), "no space left on device") })
	os.Remove(filepath.Join(logs, "filler"))
	send(64 << 10)
	e2e.WaitFor(t, "the client", func() bool { next, _, _, _, _ := fast.state(); return next == off })
	e2e.WaitFor(t, "the log to resume", func() bool {
		b, _ := os.ReadFile(logPath)
		return bytes.HasSuffix(b, pattern(off-lineLen, lineLen))
	})
	log, _ := os.ReadFile(logPath)
	c := &checker{}
	c.write(log)
	_, _, announced, err, _ := fast.state()
	if err != nil || announced != 0 {
		t.Errorf("the client lost %d bytes (%v) while the disk was full", announced, err)
	}
	if c.err != nil || c.announced == 0 || !strings.Contains(strings.Join(c.notices, "\n"), "bytes not logged (no space left on device)") {
		t.Errorf("log: %v; notices %q", c.err, c.notices)
	}
	figure(t, "disk full while %d MiB streamed: the client lost 0 bytes; the log marked %d bytes not logged (%q) and resumed",
		off>>20, c.announced, c.notices[len(c.notices)-1])
}

func TestSIGHUPStormDuringAStream(t *testing.T) {
	total := uint64(scale(5, 50)) << 20
	hups := scale(10, 100)
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	d := startDaemon(t, dir, "--console-log", logPath, "--console-log-max-size", "8MiB", "--console-log-max-files", "10")
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	conn := v.waitConn(t)
	fast := attach(t, d.sock, 0)
	every := total / uint64(hups)
	sent := 0
	for off := uint64(0); off < total; off += 64 << 10 {
		e2e.WaitFor(t, "the client", func() bool { next, _, _, _, _ := fast.state(); return next+512<<10 > off })
		conn.Write(pattern(off, 64<<10))
		if off/every >= uint64(sent) && sent < hups {
			d.Cmd.Process.Signal(syscall.SIGHUP)
			sent++
		}
	}
	e2e.WaitFor(t, "the log to catch up", func() bool {
		b, _ := os.ReadFile(logPath)
		return bytes.HasSuffix(b, pattern(total-lineLen, lineLen))
	})
	// Signals of one kind do not queue: a burst may be one reopen. A last
	// SIGHUP, once its reopen shows, means all before it were handled.
	before := strings.Count(d.Stderr.String(), "console log reopened")
	d.Cmd.Process.Signal(syscall.SIGHUP)
	e2e.WaitFor(t, "the last reopen", func() bool { return strings.Count(d.Stderr.String(), "console log reopened") > before })
	reopens := strings.Count(d.Stderr.String(), "console log reopened")
	var all []byte
	for k := 10; k >= 1; k-- {
		b, _ := os.ReadFile(fmt.Sprintf("%s.%d", logPath, k))
		all = append(all, b...)
	}
	b, _ := os.ReadFile(logPath)
	all = append(all, b...)
	c := &checker{}
	c.write(all)
	if c.err != nil || c.next != total {
		t.Errorf("the log files concatenate to %d bytes of the stream (%v), want %d", c.next, c.err, total)
	}
	figure(t, "%d SIGHUPs during a %d MiB stream (rotating at 8 MiB), %d reopens (signals of a kind coalesce): the log files concatenate to the stream; %d bytes announced as not logged",
		hups+1, total>>20, reopens, c.announced)
}

func TestKill9AndRestart(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	d := startDaemon(t, dir, "--console-log", logPath)
	v := startVMM(t, filepath.Join(dir, "vmm.sock"))
	v.waitConn(t).Write([]byte("history before the crash\n"))
	e2e.WaitFor(t, "the log", func() bool { b, _ := os.ReadFile(logPath); return bytes.Contains(b, []byte("crash\n")) })
	d.Cmd.Process.Signal(syscall.SIGKILL)
	d.Wait(t)
	if _, err := os.Lstat(d.sock); err != nil {
		t.Fatalf("kill -9 left no stale socket to reclaim: %v", err)
	}
	v.kill()
	d2 := startDaemon(t, dir, "--console-log", logPath)
	conn, err := net.Dial("unix", d2.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	want := "history before the crash\n[consoleproxy] restarted; history above is from the console log\r\n"
	conn.SetReadDeadline(time.Now().Add(e2e.WaitTimeout))
	got := make([]byte, 0, 256)
	buf := make([]byte, 256)
	for !bytes.Contains(got, []byte(want)) {
		n, err := conn.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("after kill -9 and restart the client got %q: %v", got, err)
		}
	}
	figure(t, "kill -9, then a restart: the stale socket was reclaimed and the history replayed from the log")
}
