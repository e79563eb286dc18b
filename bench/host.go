package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Host mode: many consoles in one process, against one process per
// console. Every VM is a fake VMM (a Unix listener in a directory of its
// own) that writes a boot banner of bannerSize bytes to the proxy when it
// connects and then stays silent; every console gets one client, which
// reads its replay and then stays idle.

var (
	hostConsoles = flag.Int("host-consoles", 1000, "host mode: consoles in the one process")
	singles      = flag.Int("singles", 1000, "host mode: single-console processes to compare with (as many as start, up to this)")
	newVMs       = flag.Int("new-vms", 100, "host mode: VMs created one at a time among the others, for the attach latency")
)

// bannerSize is what each VM prints before going idle: a short boot log.
// With the connected notice ahead of it, it lies in the first 4 KiB page
// of the console's ring, the only ring page written.
const bannerSize = 1536

const pageSize = 4096

// ringPagesWritten is how many 4 KiB pages of each ring the run writes:
// the ring is one allocation (page-aligned, as the Go runtime places
// allocations larger than 32 KiB), written from its start with the
// "upstream connected" notice and the banner, and never written
// elsewhere. Pages of it never written are not resident (FACTS.md).
func ringPagesWritten() int {
	const notice = len("[consoleproxy] upstream connected\r\n")
	return (notice + bannerSize + pageSize - 1) / pageSize
}

func banner(name string) []byte {
	var b []byte
	for i := 0; len(b) < bannerSize; i++ {
		line := fmt.Sprintf("[    0.%06d] %s: boot message %d of a quiet guest kernel", i*1013, name, i)
		b = append(b, line...)
		b = append(b, strings.Repeat(".", 63-len(line)%64)...)
		b = append(b, '\n')
	}
	b = b[:bannerSize]
	b[len(b)-1] = '\n'
	return b
}

// hostVM is one fake VMM: it listens, writes the banner to each
// connection (Cloud Hypervisor keeps one, the newest) and discards input.
type hostVM struct {
	name, dir string
	ln        *net.UnixListener
	listened  time.Time
	accepted  chan time.Duration // the first connection, listen() to accept()
	mu        sync.Mutex
	conns     []net.Conn
	wg        sync.WaitGroup
}

func startHostVM(root, name string) (*hostVM, error) {
	v := &hostVM{name: name, dir: filepath.Join(root, name), accepted: make(chan time.Duration, 1)}
	if err := os.Mkdir(v.dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, err
	}
	b := banner(name)
	v.listened = time.Now()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(v.dir, "serial.sock"), Net: "unix"})
	if err != nil {
		return nil, err
	}
	v.ln = ln
	v.wg.Go(func() {
		first := true
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if first {
				v.accepted <- time.Since(v.listened)
				first = false
			}
			v.mu.Lock()
			v.conns = append(v.conns, c)
			v.mu.Unlock()
			c.Write(b)
			v.wg.Go(func() { io.Copy(io.Discard, c) })
		}
	})
	return v, nil
}

func (v *hostVM) close() {
	v.ln.Close()
	v.mu.Lock()
	for _, c := range v.conns {
		c.Close()
	}
	v.mu.Unlock()
	v.wg.Wait()
}

// idleClient connects to sock and reads the replay (the notice and the
// banner), then stays connected without reading.
func idleClient(sock string) (net.Conn, error) {
	var c net.Conn
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if c, err = net.Dial("unix", sock); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		return nil, err
	}
	want := len("[consoleproxy] upstream connected\r\n") + bannerSize
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, want)); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: replay: %w", sock, err)
	}
	c.SetReadDeadline(time.Time{})
	return c, nil
}

// procMem is one process's memory from /proc: PSS and its anonymous part
// from smaps_rollup, RSS, threads and descriptors.
type procMem struct {
	pss, pssAnon, rss int // KiB
	threads, fds      int
	inotify           int // inotify instances among the descriptors
}

func readProcMem(pid int) procMem {
	var m procMem
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "Pss:":
			m.pss = n
		case "Pss_Anon:":
			m.pssAnon = n
		case "Rss:":
			m.rss = n
		}
	}
	m.threads = statusField(pid, "Threads:")
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	m.fds = len(entries)
	for _, e := range entries {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); l == "anon_inode:inotify" {
			m.inotify++
		}
	}
	return m
}

func statusField(pid int, field string) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return 0
}

// raiseNOFILE lifts this process's soft descriptor limit to the hard one:
// it holds three descriptors per console (listener, the VMM's end, the
// client). The daemon's Go runtime raises its own.
func raiseNOFILE() int {
	var r syscall.Rlimit
	check(syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r))
	r.Cur = r.Max
	check(syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r))
	return int(r.Cur)
}

type hostFigures struct {
	consoles         int
	empty, full      procMem // the host process with no console, and with all of them and their clients
	idleTicks        int
	attachP50        time.Duration
	attachP99        time.Duration
	attachMax        time.Duration
	discover         time.Duration // all consoles appearing at once, to every one attached
	singles          int           // single-console processes that ran
	singleMem        procMem       // summed over them
	singleIdleTicks  int
	singleStartError string // why no more started, if fewer than asked
	loadBefore       string
	loadAfter        string
}

// hostMode measures one consoleproxy serving hostConsoles consoles against
// single-console processes.
func hostMode() hostFigures {
	limit := raiseNOFILE()
	need := 3*(*hostConsoles+*newVMs) + 3**singles + 64
	if limit < need {
		check(fmt.Errorf("host mode needs about %d descriptors; the hard limit is %d", need, limit))
	}
	f := hostFigures{consoles: *hostConsoles, loadBefore: loadAverage()}
	work, err := os.MkdirTemp("", "cpb-host-")
	check(err)
	defer os.RemoveAll(work)
	root := filepath.Join(work, "vms")
	check(os.Mkdir(root, 0o755))

	// One process for every console.
	relay := exec.Command(*binary, "--upstream", "unix:"+filepath.Join(root, "*", "serial.sock"), "--listen", "{dir}/console.sock",
		"--status", filepath.Join(work, "status.sock"), "--max-consoles", strconv.Itoa(*hostConsoles+*newVMs), "--log-level", "warn")
	relay.Stderr = os.Stderr
	check(relay.Start())
	defer func() { relay.Process.Kill(); relay.Wait() }()
	pid := relay.Process.Pid
	waitSocket(filepath.Join(work, "status.sock"))
	settle := func() { time.Sleep(time.Second) }
	settle()
	f.empty = readProcMem(pid)

	// All the VMs at once, as on a host where the proxy starts last.
	fmt.Fprintf(os.Stderr, "host mode: %d VMs under one process\n", *hostConsoles)
	vms := make([]*hostVM, 0, *hostConsoles+*newVMs)
	defer func() {
		for _, v := range vms {
			v.close()
		}
	}()
	start := time.Now()
	for i := range *hostConsoles {
		v, err := startHostVM(root, fmt.Sprintf("vm%04d", i))
		check(err)
		vms = append(vms, v)
	}
	for _, v := range vms {
		select {
		case <-v.accepted:
		case <-time.After(30 * time.Second):
			check(fmt.Errorf("%s was not attached", v.name))
		}
	}
	f.discover = time.Since(start)
	clients := make([]net.Conn, 0, *hostConsoles)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for _, v := range vms {
		c, err := idleClient(filepath.Join(v.dir, "console.sock"))
		check(err)
		clients = append(clients, c)
	}
	settle()
	f.full = readProcMem(pid)
	t0 := cpuTicks(pid)
	time.Sleep(10 * time.Second)
	f.idleTicks = cpuTicks(pid) - t0

	// New VMs appearing one at a time among the others.
	var attach []time.Duration
	tick := time.NewTicker(20 * time.Millisecond)
	for i := range *newVMs {
		<-tick.C
		v, err := startHostVM(root, fmt.Sprintf("new%04d", i))
		check(err)
		vms = append(vms, v)
		select {
		case d := <-v.accepted:
			attach = append(attach, d)
		case <-time.After(30 * time.Second):
			check(fmt.Errorf("%s was not attached", v.name))
		}
	}
	tick.Stop()
	slices.Sort(attach)
	f.attachP50, f.attachP99, f.attachMax = nearestRank(attach, 50), nearestRank(attach, 99), attach[len(attach)-1]
	relay.Process.Kill()
	relay.Wait()
	for _, c := range clients {
		c.Close()
	}
	clients = clients[:0]
	for _, v := range vms {
		v.close()
	}
	vms = vms[:0]

	f.singles, f.singleMem, f.singleIdleTicks, f.singleStartError = singleProcesses(work, *singles)
	f.loadAfter = loadAverage()
	return f
}

// singleProcesses runs up to n single-console processes, each with its
// fake VMM and one idle client, and returns how many ran, their memory
// summed, and their CPU ticks over 10 s idle.
func singleProcesses(work string, n int) (ran int, sum procMem, ticks int, stopped string) {
	fmt.Fprintf(os.Stderr, "host mode: up to %d single-console processes\n", n)
	root := filepath.Join(work, "single")
	check(os.Mkdir(root, 0o755))
	var procs []*exec.Cmd
	var vms []*hostVM
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
		for _, p := range procs {
			p.Process.Kill()
			p.Wait()
		}
		for _, v := range vms {
			v.close()
		}
	}()
	for i := range n {
		v, err := startHostVM(root, fmt.Sprintf("vm%04d", i))
		if err != nil {
			stopped = err.Error()
			break
		}
		vms = append(vms, v)
		p := exec.Command(*binary, "--upstream", "unix:"+filepath.Join(v.dir, "serial.sock"), "--listen", filepath.Join(v.dir, "console.sock"), "--log-level", "warn")
		p.Stderr = os.Stderr
		if err := p.Start(); err != nil {
			stopped = err.Error()
			break
		}
		procs = append(procs, p)
		c, err := idleClient(filepath.Join(v.dir, "console.sock"))
		if err != nil {
			stopped = err.Error()
			break
		}
		clients = append(clients, c)
	}
	ran = len(clients)
	time.Sleep(time.Second)
	for _, p := range procs[:ran] {
		m := readProcMem(p.Process.Pid)
		sum.pss += m.pss
		sum.pssAnon += m.pssAnon
		sum.rss += m.rss
		sum.threads += m.threads
		sum.fds += m.fds
		sum.inotify += m.inotify
	}
	before := make([]int, ran)
	for i, p := range procs[:ran] {
		before[i] = ownTicks(p.Process.Pid)
	}
	time.Sleep(10 * time.Second)
	for i, p := range procs[:ran] {
		ticks += ownTicks(p.Process.Pid) - before[i]
	}
	return ran, sum, ticks, stopped
}

// nearestRank returns the p-th percentile of sorted ds by the nearest
// rank: of 100 samples, p99 is the 99th smallest.
func nearestRank(ds []time.Duration, p int) time.Duration {
	return ds[max(0, (len(ds)*p+99)/100-1)]
}

// ownTicks is the CPU time of pid alone: cpuTicks scans every process
// for children, too slow for a thousand of them.
func ownTicks(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

func loadAverage() string {
	b, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}

// report writes the host-mode figures as markdown.
func (f hostFigures) report() string {
	var b strings.Builder
	ring := ringPagesWritten() * pageSize / 1024
	per := func(total, n int) float64 { return float64(total) / float64(n) }
	marginal := per(f.full.pss-f.empty.pss, f.consoles)
	fmt.Fprintf(&b, "Machine: %s, %d cores, shared (load average %s before, %s after). Each VM prints a %d-byte boot banner and goes idle; each console has one idle client that read its replay.\n\n",
		cpuModel(), cpuCount(), f.loadBefore, f.loadAfter, bannerSize)
	fmt.Fprintf(&b, "| %d idle consoles, one idle client each | host mode: one process | one process per console (%d processes) |\n|---|---|---|\n", f.consoles, f.singles)
	fmt.Fprintf(&b, "| PSS per console | %.1f KiB (%.1f KiB beyond the process with no console) | %.1f KiB |\n", per(f.full.pss, f.consoles), marginal, per(f.singleMem.pss, f.singles))
	fmt.Fprintf(&b, "| of which ring pages written | %d KiB | %d KiB |\n", ring, ring)
	fmt.Fprintf(&b, "| PSS per console beyond them (target <= 64 KiB) | %.1f KiB | %.1f KiB |\n", marginal-float64(ring), per(f.singleMem.pss, f.singles)-float64(ring))
	fmt.Fprintf(&b, "| RSS per console | %.1f KiB | %.1f KiB |\n", per(f.full.rss-f.empty.rss, f.consoles), per(f.singleMem.rss, f.singles))
	fmt.Fprintf(&b, "| whole process(es) | PSS %s, RSS %s (%s, %s with no console) | PSS %s, RSS %s |\n",
		kib(f.full.pss), kib(f.full.rss), kib(f.empty.pss), kib(f.empty.rss), kib(f.singleMem.pss), kib(f.singleMem.rss))
	fmt.Fprintf(&b, "| descriptors per console | %.1f | %.1f |\n", per(f.full.fds-f.empty.fds, f.consoles), per(f.singleMem.fds, f.singles))
	fmt.Fprintf(&b, "| threads | %d | %d |\n", f.full.threads, f.singleMem.threads)
	fmt.Fprintf(&b, "| inotify instances | %d | %d |\n", f.full.inotify, f.singleMem.inotify)
	fmt.Fprintf(&b, "| CPU ticks over 10 s idle (1 tick = 10 ms) | %d | %d (all processes) |\n", f.idleTicks, f.singleIdleTicks)
	fmt.Fprintf(&b, "| attach of a VM appearing among %d (listen() to the proxy's connection accepted, %d VMs one at a time) | p50 %s, p99 %s, max %s | – |\n",
		f.consoles, *newVMs, ms(f.attachP50), ms(f.attachP99), ms(f.attachMax))
	fmt.Fprintf(&b, "| %d VMs appearing at once, to the last attached | %s | – |\n", f.consoles, ms(f.discover))
	if f.singleStartError != "" {
		fmt.Fprintf(&b, "\nSingle-console processes stopped at %d: %s\n", f.singles, f.singleStartError)
	}
	fmt.Fprintf(&b, "\nRing pages written: every console's ring (1 MiB, one page-aligned allocation) holds the %d-byte connected notice and banner from its start, so %d page of 4 KiB per console is written; the rest of the ring is never touched and not resident. \"Beyond them\" subtracts those pages from the PSS per console (host mode: beyond the process with no console).\n",
		len("[consoleproxy] upstream connected\r\n")+bannerSize, ringPagesWritten())
	return b.String()
}
