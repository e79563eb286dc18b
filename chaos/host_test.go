package chaos

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/e2e"
)

// hostDaemon is consoleproxy in host mode over root/*/serial.sock, each
// console's client socket next to its VMM's, with a status socket.
type hostDaemon struct {
	*daemon
	root, status string
}

func startHostDaemon(t *testing.T, root string, extra ...string) *hostDaemon {
	t.Helper()
	status := filepath.Join(filepath.Dir(root), "status.sock")
	args := append([]string{
		"--upstream", "unix:" + filepath.Join(root, "*", "serial.sock"),
		"--listen", "{dir}/console.sock",
		"--status", status,
	}, extra...)
	h := &hostDaemon{daemon: &daemon{Proc: e2e.Start(t, nil, binary, args...), sock: status}, root: root, status: status}
	e2e.WaitFor(t, "the status socket", func() bool { _, err := h.consoles(); return err == nil })
	return h
}

// consoleStatus is a console in the status document, in the contract's
// names.
type consoleStatus struct {
	Name             string `json:"name"`
	Upstream         string `json:"upstream"`
	UpstreamUp       bool   `json:"upstream_up"`
	UpstreamConnects uint64 `json:"upstream_connects"`
	Listen           string `json:"listen"`
	Clients          []struct {
		ID       uint64 `json:"id"`
		Socket   string `json:"socket"`
		BytesOut uint64 `json:"bytes_out"`
	} `json:"clients"`
}

// consoles reads one status document; safe to call from any goroutine.
func (h *hostDaemon) consoles() (map[string]consoleStatus, error) {
	c, err := net.Dial("unix", h.status)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(e2e.WaitTimeout))
	b, err := io.ReadAll(c)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Consoles []consoleStatus `json:"consoles"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("status document %q: %w", b, err)
	}
	m := make(map[string]consoleStatus, len(doc.Consoles))
	for _, cs := range doc.Consoles {
		m[cs.Name] = cs
	}
	return m, nil
}

// names lists the consoles the status document shows, sorted.
func (h *hostDaemon) names(t *testing.T) []string {
	t.Helper()
	m, err := h.consoles()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// unixSocketsUnder lists the Unix sockets in the system bound to a path
// under dir, listening or accepted, whether or not their file is still
// there: a listener the proxy forgot to close shows here after its
// directory is gone.
func unixSocketsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 8 && strings.HasPrefix(f[7], dir+"/") {
			found = append(found, f[7])
		}
	}
	return found
}

// How a churning VM goes away.
const (
	endRemoveDir   = iota // rm -rf of its directory while its VMM runs
	endVMMThenDir         // the VMM exits (its socket with it), then rm -rf
	endVMMDirStays        // the VMM exits; the directory stays: --retire-after
	endKinds              // how many
)

// churnRetireAfter is the churn's --retire-after: short, so that VMs left
// to it retire within the test.
const churnRetireAfter = time.Second

// churnVM is a short-lived VM with Cloud Hypervisor's semantics: one
// client, and the socket file goes with the VMM. Its life runs in one
// goroutine (live), which may not call t.Fatal: it records err.
type churnVM struct {
	name, dir string
	end       int
	destroy   chan struct{} // closed by the schedule: end now
	done      chan struct{} // closed when live returns

	// Set by live, read after done.
	attach  time.Duration // listen() to the proxy's connection accepted
	retire  time.Duration // the end to the client's EOF after the notice
	removed time.Time     // when the directory went (endRemoveDir, endVMMThenDir)
	err     error
}

func (v *churnVM) banner() string { return "boot banner of " + v.name + "\n" }

// live runs the VM: listen, wait for the proxy, write the banner, check
// that a client gets it as the replay and that the status document shows
// the console; then, once destroyed, end as v.end says and check that the
// client got the retired notice and the proxy left nothing behind.
func (v *churnVM) live(h *hostDaemon) {
	defer close(v.done)
	v.err = v.run(h)
}

func (v *churnVM) run(h *hostDaemon) error {
	sockPath := filepath.Join(v.dir, "serial.sock")
	start := time.Now()
	ln, err := net.Listen("unix", sockPath)
	if err != nil {
		return err
	}
	defer ln.Close() // removes the socket file, as the VMM's exit does
	ul := ln.(*net.UnixListener)
	ul.SetDeadline(time.Now().Add(e2e.WaitTimeout))
	conn, err := ul.Accept()
	if err != nil {
		return fmt.Errorf("the proxy did not attach: %w", err)
	}
	v.attach = time.Since(start)
	defer conn.Close()
	if _, err := conn.Write([]byte(v.banner())); err != nil {
		return fmt.Errorf("banner: %w", err)
	}

	// Attached means listening too: the client socket is bound before the
	// upstream is dialled, so it must accept at once.
	cl, err := net.Dial("unix", filepath.Join(v.dir, "console.sock"))
	if err != nil {
		return fmt.Errorf("the upstream is attached but the client socket is not listening: %w", err)
	}
	defer cl.Close()
	cl.SetReadDeadline(time.Now().Add(e2e.WaitTimeout))
	replay := "[consoleproxy] upstream connected\r\n" + v.banner()
	got := make([]byte, len(replay))
	if _, err := io.ReadFull(cl, got); err != nil || string(got) != replay {
		return fmt.Errorf("replay %q (%v), want %q", got, err, replay)
	}
	st, err := h.consoles()
	if err != nil {
		return err
	}
	cs, ok := st[v.name]
	switch {
	case !ok:
		return errors.New("attached, but not in the status document")
	case !cs.UpstreamUp || cs.UpstreamConnects != 1 || len(cs.Clients) != 1 || cs.Listen != filepath.Join(v.dir, "console.sock"):
		return fmt.Errorf("status document: %+v", cs)
	}

	<-v.destroy
	var ended time.Time
	switch v.end {
	case endRemoveDir:
		if err := os.RemoveAll(v.dir); err != nil {
			return err
		}
		ended = time.Now()
		v.removed = ended
	case endVMMThenDir:
		conn.Close()
		ln.Close()
		if err := os.RemoveAll(v.dir); err != nil {
			return err
		}
		ended = time.Now()
		v.removed = ended
	case endVMMDirStays:
		conn.Close()
		ln.Close()
		ended = time.Now()
	}
	rest, err := io.ReadAll(cl)
	if err != nil {
		return fmt.Errorf("after the end, the client read %q: %w", rest, err)
	}
	v.retire = time.Since(ended)
	const retired = "[consoleproxy] console retired\r\n"
	// The VMM's exit may be seen before the directory's removal, and a
	// VMM that closes its connection a moment before its socket may be
	// dialled again in between (the kernel then resets that connection):
	// a restart, as far as the proxy can tell.
	if got := string(rest); got != retired && (v.end == endRemoveDir || !afterExitRE.MatchString(got)) {
		return fmt.Errorf("after the end, the client got %q, want the retired notice after at most the upstream's comings and goings", rest)
	}
	if v.end == endVMMDirStays {
		// The proxy removes its socket (after closing its clients) and
		// leaves nothing else.
		var entries []os.DirEntry
		if err := waitUntil(func() bool { entries, err = os.ReadDir(v.dir); return err == nil && len(entries) == 0 }); err != nil {
			return fmt.Errorf("the retired console's directory holds %v (%v), want nothing", entries, err)
		}
		if err := os.Remove(v.dir); err != nil {
			return err
		}
		v.removed = time.Now()
	}
	return nil
}

// afterExitRE is what a client of a console whose VMM exited may receive
// before the retired notice.
var afterExitRE = regexp.MustCompile(`^(\[consoleproxy\] upstream lost: [^\r\n]*\r\n(\[consoleproxy\] upstream connected\r\n)?)*\[consoleproxy\] console retired\r\n$`)

// loadAverage is the machine's one-minute load average, for the figures:
// these cores are shared.
func loadAverage() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// waitUntil is e2e.WaitFor for goroutines other than the test's.
func waitUntil(cond func() bool) error {
	deadline := time.Now().Add(e2e.WaitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// percentile returns the p-th percentile of ds (sorted in place).
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[min(len(ds)-1, len(ds)*p/100)]
}

func msf(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

// A streaming console: a long-lived VM writing the pattern, a client
// checking every byte.
type stream struct {
	name string
	conn net.Conn // the VMM's end of the proxy's connection
	cl   *client
	off  uint64 // written so far; owned by the writer until it returns
}

// write streams the pattern until stop is closed, paced by a ticker and
// kept within half a ring of the client, so that nothing may be dropped.
func (s *stream) write(stop <-chan struct{}) error {
	const chunk = 2 << 10 // 2 MiB/s at most: far beyond a UART, and the 2 cores stay free for the churn
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return nil
		case <-tick.C:
		}
		if next, _, _, _, _ := s.cl.state(); next+512<<10 <= s.off {
			continue
		}
		if _, err := s.conn.Write(pattern(s.off, chunk)); err != nil {
			return fmt.Errorf("%s: VMM write: %w", s.name, err)
		}
		s.off += chunk
	}
}

func (cl *client) first() uint64 {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.c.first
}

// TestHostChurnAttachesAndRetiresEveryVM creates and destroys VMs at a
// steady rate under one host-mode proxy while other consoles stream to
// checking clients: every VM must be attached (the proxy connected, its
// client socket listening, its replay and status entry right) and
// retired (the notice, then EOF, and gone from the status document), the
// streams must lose nothing, and the proxy's goroutines and descriptors
// must come back to where they were.
func TestHostChurnAttachesAndRetiresEveryVM(t *testing.T) {
	rate := scale(50, 100) // VMs created (and destroyed) per second
	churnFor := time.Duration(scale(1, 10)) * time.Second
	streams := scale(3, 5)
	lifetime := rate / 2 // in ticks: each VM lives half a second
	tickEvery := time.Second / time.Duration(rate)

	root := filepath.Join(t.TempDir(), "vms")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	// Streaming VMs: some there before the daemon starts, some after.
	var ss []*stream
	vmmOf := map[string]*vmm{}
	newStreamVM := func(i int) {
		name := fmt.Sprintf("s%d", i)
		os.Mkdir(filepath.Join(root, name), 0o755)
		vmmOf[name] = startVMM(t, filepath.Join(root, name, "serial.sock"))
	}
	for i := range streams / 2 {
		newStreamVM(i)
	}
	d := startHostDaemon(t, root, "--retire-after", churnRetireAfter.String())
	for i := streams / 2; i < streams; i++ {
		newStreamVM(i)
	}
	for i := range streams {
		name := fmt.Sprintf("s%d", i)
		conn := vmmOf[name].waitConn(t) // attached: its client socket listens
		ss = append(ss, &stream{name: name, conn: conn, cl: attach(t, filepath.Join(root, name, "console.sock"), 0)})
	}
	stop := make(chan struct{})
	writerErr := make(chan error, len(ss))
	for _, s := range ss {
		go func() { writerErr <- s.write(stop) }()
	}
	stopWriters := sync.OnceValue(func() error {
		close(stop)
		var errs []error
		for range ss {
			errs = append(errs, <-writerErr)
		}
		return errors.Join(errs...)
	})
	t.Cleanup(func() { stopWriters() })
	for _, s := range ss {
		s.cl.reached(t, s.name+"'s first bytes", 64<<10)
	}
	baseG, baseFD := d.stats(t)

	// The status document, sampled while the VMs churn: when each console
	// was last listed, and that nothing unknown ever is.
	var (
		seenMu   sync.Mutex
		lastSeen = map[string]time.Time{}
		seenErr  error
	)
	samplerDone := make(chan struct{})
	samplerStop := make(chan struct{})
	stopSampler := sync.OnceFunc(func() {
		close(samplerStop)
		<-samplerDone
	})
	t.Cleanup(stopSampler)
	go func() {
		defer close(samplerDone)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-samplerStop:
				return
			case <-tick.C:
			}
			m, err := d.consoles()
			now := time.Now()
			seenMu.Lock()
			if err != nil && seenErr == nil {
				seenErr = err
			}
			for n := range m {
				lastSeen[n] = now
			}
			seenMu.Unlock()
		}
	}()

	// The churn: at each tick a VM's directory is made; its socket follows
	// at once (even VMs) or at the next tick (odd ones, as a VMM started
	// after its directory was made); the VM made lifetime ticks earlier is
	// destroyed, each in one of the ways a VM goes.
	var vms []*churnVM
	newVM := func(i int) *churnVM {
		v := &churnVM{name: fmt.Sprintf("c%d", i), end: i % endKinds, destroy: make(chan struct{}), done: make(chan struct{})}
		v.dir = filepath.Join(root, v.name)
		if err := os.Mkdir(v.dir, 0o755); err != nil {
			t.Fatal(err)
		}
		return v
	}
	var spawned []*churnVM
	spawn := func(v *churnVM) {
		spawned = append(spawned, v)
		go v.live(d)
	}
	t.Cleanup(func() {
		for _, v := range spawned {
			select {
			case <-v.destroy:
			default:
				close(v.destroy)
			}
			<-v.done
		}
	})
	load := loadAverage()
	created := int(churnFor / tickEvery)
	tick := time.NewTicker(tickEvery)
	start := time.Now()
	var creating time.Duration // from the first VM made to the last
	for k := 0; k < created+lifetime+1; k++ {
		<-tick.C
		if k == created-1 {
			creating = time.Since(start)
		}
		if k < created {
			vms = append(vms, newVM(k))
			if k%2 == 0 {
				spawn(vms[k])
			}
		}
		if k >= 1 && k-1 < created && (k-1)%2 == 1 {
			spawn(vms[k-1])
		}
		if j := k - lifetime; j >= 0 && j < created {
			close(vms[j].destroy)
		}
	}
	tick.Stop()
	churned := time.Since(start)
	for _, v := range vms {
		<-v.done
	}
	stopSampler()

	// Every VM was attached and retired.
	var attaches, dirRetires, timedRetires []time.Duration
	failed := 0
	for _, v := range vms {
		if v.err != nil {
			if failed++; failed <= 10 {
				t.Errorf("VM %s (end %d): %v", v.name, v.end, v.err)
			}
			continue
		}
		attaches = append(attaches, v.attach)
		// The contract: retired within a second of the directory going,
		// or of --retire-after passing.
		if v.end == endVMMDirStays {
			timedRetires = append(timedRetires, v.retire)
			if v.retire < churnRetireAfter*9/10 || v.retire > churnRetireAfter+time.Second {
				t.Errorf("VM %s: retired %v after its VMM exited, with --retire-after %v", v.name, v.retire, churnRetireAfter)
			}
		} else {
			dirRetires = append(dirRetires, v.retire)
			if v.retire > time.Second {
				t.Errorf("VM %s: retired %v after its directory was removed", v.name, v.retire)
			}
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d VMs failed", failed, len(vms))
	}
	// Listed in the status document no later than the sampler's first
	// look after the directory went, plus the contract's second.
	var statusLate time.Duration
	seenMu.Lock()
	for _, v := range vms {
		late := lastSeen[v.name].Sub(v.removed)
		statusLate = max(statusLate, late)
		if late > time.Second {
			t.Errorf("VM %s was still in the status document %v after its directory was removed", v.name, late)
		}
	}
	for n := range lastSeen {
		if !strings.HasPrefix(n, "c") && !strings.HasPrefix(n, "s") {
			t.Errorf("the status document listed %q, which is no VM", n)
		}
	}
	if seenErr != nil {
		t.Errorf("status socket during the churn: %v", seenErr)
	}
	seenMu.Unlock()

	// The churn left only the streaming consoles, with nothing of the
	// others' sockets, goroutines or descriptors.
	var want []string
	for _, s := range ss {
		want = append(want, s.name)
	}
	slices.Sort(want)
	e2e.WaitFor(t, "the status document to list the streaming consoles only", func() bool { return slices.Equal(d.names(t), want) })
	var g, fds int
	e2e.WaitFor(t, "goroutines and descriptors back to the baseline", func() bool {
		g, fds = d.stats(t)
		return g <= baseG && fds <= baseFD
	})
	for _, p := range unixSocketsUnder(t, root) {
		// Bound as root/VM/.consoleproxy-*/s, then renamed into place.
		if vm, _, _ := strings.Cut(strings.TrimPrefix(p, root+"/"), "/"); !strings.HasPrefix(vm, "s") {
			t.Errorf("a socket of a churned VM is still open: %s", p)
		}
	}

	// Every byte on the streaming consoles.
	if err := stopWriters(); err != nil {
		t.Fatal(err)
	}
	var streamed uint64
	for _, s := range ss {
		s.cl.reached(t, s.name+"'s stream", s.off)
		next, notices, announced, err, eof := s.cl.state()
		if first := s.cl.first(); err != nil || eof != nil || first != 0 || next != s.off || announced != 0 || !slices.Equal(notices, []string{"upstream connected"}) {
			t.Errorf("%s: bytes %d to %d of %d, %d announced lost, notices %q, err %v, eof %v", s.name, first, next, s.off, announced, notices, err, eof)
		}
		streamed += s.off
	}
	if n := strings.Count(d.Stderr.String(), "console attached"); n != len(vms)+len(ss) {
		t.Errorf("the daemon logged %d consoles attached, want %d", n, len(vms)+len(ss))
	}
	figure(t, "%d VMs created and destroyed in %.1fs (created at %.0f/s, %d alive at a time; a third each: directory removed, VMM exited then directory removed, VMM exited with --retire-after %v) beside %d streaming consoles: "+
		"every VM attached (listen to the proxy's connect p50 %s, p99 %s, max %s), its replay and status entry right; every one retired (client EOF after the notice p50 %s, p99 %s after its directory went; %s p50 after its VMM exited with the directory left); "+
		"%d MiB streamed, 0 bytes lost; goroutines %d before, %d after; descriptors %d before, %d after",
		len(vms), churned.Seconds(), float64(len(vms)-1)/creating.Seconds(), lifetime, churnRetireAfter, len(ss),
		msf(percentile(attaches, 50)), msf(percentile(attaches, 99)), msf(percentile(attaches, 100)),
		msf(percentile(dirRetires, 50)), msf(percentile(dirRetires, 99)), msf(percentile(timedRetires, 50)),
		streamed>>20, baseG, g, baseFD, fds)
	figure(t, "the status document, sampled every 20 ms, listed a removed VM's console at most %s after its directory went; load average %s before the churn, %s after (2 shared cores)",
		msf(max(statusLate, 0)), load, loadAverage())
}

// TestHostConsoleThatCannotStartIsSkipped puts a regular file where a
// console's client socket goes: that console is logged with its name and
// skipped while the others work, and starts once the file is removed.
func TestHostConsoleThatCannotStartIsSkipped(t *testing.T) {
	root := filepath.Join(t.TempDir(), "vms")
	vmms := map[string]*vmm{}
	newVM := func(name string, inTheWay bool) {
		dir := filepath.Join(root, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if inTheWay {
			if err := os.WriteFile(filepath.Join(dir, "console.sock"), []byte("not a socket\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		vmms[name] = startVMM(t, filepath.Join(dir, "serial.sock"))
	}
	// b is in the way from the start; d, which appears later, too.
	newVM("a", false)
	newVM("b", true)
	d := startHostDaemon(t, root)
	newVM("c", false)
	newVM("d", true)

	cannot := func(name string) int {
		n := 0
		for _, l := range strings.Split(d.Stderr.String(), "\n") {
			if strings.Contains(l, "console cannot start") && strings.Contains(l, "console="+name+" ") &&
				strings.Contains(l, filepath.Join(root, name, "console.sock")) {
				n++
			}
		}
		return n
	}
	e2e.WaitFor(t, "b and d to be logged as unable to start", func() bool { return cannot("b") == 1 && cannot("d") == 1 })
	// The others work: attached, their bytes through.
	clients := map[string]*client{}
	for _, name := range []string{"a", "c"} {
		conn := vmms[name].waitConn(t)
		clients[name] = attach(t, filepath.Join(root, name, "console.sock"), 0)
		conn.Write(pattern(0, 64<<10))
		clients[name].reached(t, name+"'s output", 64<<10)
	}
	if got := d.names(t); !slices.Equal(got, []string{"a", "c"}) {
		t.Errorf("status lists %q, want a and c", got)
	}
	for _, name := range []string{"b", "d"} {
		if b, err := os.ReadFile(filepath.Join(root, name, "console.sock")); string(b) != "not a socket\n" {
			t.Errorf("the file in %s's way was changed: %q, %v", name, b, err)
		}
	}
	// Another change in b's directory: tried again, still in the way,
	// not logged again. Then the files go: b and d start.
	os.WriteFile(filepath.Join(root, "b", "unrelated"), nil, 0o644)
	for _, name := range []string{"b", "d"} {
		os.Remove(filepath.Join(root, name, "console.sock"))
		conn := vmms[name].waitConn(t)
		cl := attach(t, filepath.Join(root, name, "console.sock"), 0)
		conn.Write(pattern(0, 64<<10))
		cl.reached(t, name+"'s output once the file is gone", 64<<10)
	}
	if got := d.names(t); !slices.Equal(got, []string{"a", "b", "c", "d"}) {
		t.Errorf("status lists %q, want a to d", got)
	}
	// Nothing disturbed the others: still streaming, every byte, one
	// connection each.
	for _, name := range []string{"a", "c"} {
		vmms[name].waitConn(t).Write(pattern(64<<10, 64<<10))
		clients[name].reached(t, name+"'s later output", 128<<10)
		_, notices, announced, err, eof := clients[name].state()
		if err != nil || eof != nil || announced != 0 || !slices.Equal(notices, []string{"upstream connected"}) {
			t.Errorf("%s: notices %q, %d announced lost, %v, %v", name, notices, announced, err, eof)
		}
	}
	select {
	case <-d.Done:
		t.Fatalf("the daemon exited; stderr:\n%s", d.Stderr)
	default:
	}
	if cannot("b") != 1 || cannot("d") != 1 {
		t.Errorf("logged %d and %d times that b and d cannot start, want once each:\n%s", cannot("b"), cannot("d"), d.Stderr)
	}
	figure(t, "a regular file where 2 of 4 consoles' sockets go (one there at start, one appearing later): each logged once with its name and skipped, the other 2 streamed on untouched; each started when its file was removed")
}
