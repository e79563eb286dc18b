// Command bench measures consoleproxy as a process, against a direct
// client of the VMM and a socat relay in the same run, and writes a
// markdown table and an SVG plot.
//
//	go run . [-quick] [-out DIR]      (from bench/, or: make bench)
//	go run . -only host               (host mode alone: results-host.md)
//
// It is not part of go test's pass/fail: these machines are shared and
// noisy, so it reports figures and ratios from one run.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	quick  = flag.Bool("quick", false, "shorter runs")
	outDir = flag.String("out", ".", "where results.md and results.svg go")
	binary = flag.String("binary", "", "consoleproxy to measure (default: build ../cmd/consoleproxy)")
	only   = flag.String("only", "", "run only the scenarios whose name contains this, or any of a comma-separated list (\"idle\" for idle CPU and RSS, \"host\" for host mode against one process per console), print them, and stop")
)

func main() {
	flag.Parse()
	work, err := os.MkdirTemp("", "cpbench-")
	check(err)
	defer os.RemoveAll(work)
	if *binary == "" {
		*binary = filepath.Join(work, "consoleproxy")
		build := exec.Command("go", "build", "-o", *binary, "./cmd/consoleproxy")
		build.Dir = ".."
		build.Stderr = os.Stderr
		check(build.Run())
	}
	dur := 5 * time.Second
	if *quick {
		dur = 2 * time.Second
	}
	var report strings.Builder
	fmt.Fprintf(&report, "Machine: %s, %d cores. Duration per run: %s. consoleproxy built from this tree; the fake VMM and all clients run in the benchmark's process on the same 2 cores.\n\n", cpuModel(), cpuCount(), dur)

	// 1. Lossless throughput at equal memory: one round, smaller than the
	// 64 MiB ring, sent as fast as it is taken, timed until every client
	// has all of it.
	// All of the round is in the ring, so a client admitted after it began
	// still receives it from its first byte.
	big := []string{"--buffer-size", "64MiB"}
	const round = 32 << 20
	var rows []result
	rows = append(rows, run(streamCfg{name: "direct to the VMM (limit), 32 MiB round", target: "direct", clients: 1, round: round, latency: true}))
	rows = append(rows, run(streamCfg{name: "socat relay, 32 MiB round", target: "socat", clients: 1, round: round, latency: true}))
	var curve []result
	for _, n := range []int{1, 10, 100, 1000} {
		r := run(streamCfg{name: fmt.Sprintf("consoleproxy, 64 MiB ring, N=%d, %d MiB round", n, roundFor(n)>>20), target: "proxy", clients: n, round: roundFor(n), args: big, latency: true})
		rows = append(rows, r)
		curve = append(curve, r)
	}
	// 2. The default configuration: flood at N=100, and paced at 10 MiB/s,
	// each beside the same load with no relay: the fake VMM serves each
	// client its own stream, so the round trips show what the harness
	// itself adds on these shared cores.
	def := []string{"--replay", "none"}
	flood := run(streamCfg{name: "consoleproxy, default 1 MiB ring, continuous flood, N=100", target: "proxy", clients: 100, dur: dur, args: def, latency: true})
	floodDirect := run(streamCfg{name: "direct to the VMM, continuous flood to each of N=100", target: "direct", clients: 100, dur: dur, latency: true})
	rows = append(rows, flood, floodDirect)
	paced := run(streamCfg{name: "consoleproxy, default, paced 10 MiB/s, N=100", target: "proxy", clients: 100, rate: 10 << 20, dur: dur, args: def, latency: true})
	pacedDirect := run(streamCfg{name: "direct to the VMM, paced 10 MiB/s to each of N=100", target: "direct", clients: 100, rate: 10 << 20, dur: dur, latency: true})
	rows = append(rows, paced, pacedDirect)
	// 3. A stuck client among 10, flood, against the same without it.
	noStuck := run(streamCfg{name: "consoleproxy, default, continuous flood, N=10", target: "proxy", clients: 10, dur: dur, args: def})
	stuck := run(streamCfg{name: "consoleproxy, default, continuous flood, N=10 + 1 stuck", target: "proxy", clients: 10, stuck: 1, dur: dur, args: def})
	rows = append(rows, noStuck, stuck)

	if *only != "" {
		if selected("host mode") {
			writeHost(hostMode())
		}
		if selected("idle and memory") {
			idleTicks, rss0, rss100, rss1000 := idleAndMemory()
			fmt.Printf("idle: %d ticks; RSS %s, %s, %s with 0, 100, 1000 idle clients (%.1f KiB per extra idle client)\n",
				idleTicks, kib(rss0), kib(rss100), kib(rss1000), float64(rss1000-rss100)/900)
		}
		return
	}
	fmt.Fprintf(&report, "| run | per client MiB/s | aggregate MiB/s | announced gaps (bytes) | silent gaps | RTT p50 | RTT p99 | quiet RTT p50 | quiet RTT p99 | peak RSS | CPU s/GiB | CPU %% |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&report, "| %s | %.0f | %.0f | %d | %d | %s | %s | %s | %s | %s | %s | %s |\n", r.name, r.perClient, r.aggregate, r.announced, r.silent,
			ms(r.p50), ms(r.p99), us(r.qp50), us(r.qp99), kib(r.rssPeak), cpuPerGiB(r), pct(r))
	}

	// 4. Idle and memory.
	idleTicks, rss0, rss100, rss1000 := idleAndMemory()
	fmt.Fprintf(&report, "\nIdle, 100 clients attached, 10 s: %d CPU ticks (1 tick = 10 ms).\n", idleTicks)
	fmt.Fprintf(&report, "RSS with a 1 MiB ring: %s with 0 idle clients, %s with 100, %s with 1000 (%.1f KiB per extra idle client).\n",
		kib(rss0), kib(rss100), kib(rss1000), float64(rss1000-rss100)/900)
	// 5. Attach delay.
	med, p90 := attachDelay(20)
	fmt.Fprintf(&report, "Attach after the VMM's socket appears (restart of the VMM, 20 times): median %s, p90 %s.\n", ms(med), ms(p90))

	// Ratios the targets are stated in.
	direct, socat := rows[0], rows[1]
	fmt.Fprintf(&report, "\nRatios in this run: N=1 lossless vs socat relay %.2fx; N=100 aggregate vs direct single client %.2fx; stuck client: others keep %.0f%% of their rate, RSS %+d KiB; paced N=100 CPU %s s/GiB; round-trip p99 while paced %s (%s with no relay under the same load).\n",
		curve[0].perClient/socat.perClient, curve[2].aggregate/direct.perClient, 100*stuck.perClient/noStuck.perClient, stuck.rssPeak-noStuck.rssPeak,
		cpuPerGiB(paced), ms(paced.p99), ms(pacedDirect.p99))
	fmt.Fprintf(&report, "Quiet round trips: N=1 p50 %s, p99 %s against socat's %s, %s (%.2fx, %.2fx); N=100 after the default flood p99 %s against %s with no relay (%.2fx). Round trips while paced: p50 %s, %+.2f ms from no relay (%s).\n",
		us(curve[0].qp50), us(curve[0].qp99), us(socat.qp50), us(socat.qp99), ratio(curve[0].qp50, socat.qp50), ratio(curve[0].qp99, socat.qp99),
		us(flood.qp99), us(floodDirect.qp99), ratio(flood.qp99, floodDirect.qp99),
		ms(paced.p50), float64((paced.p50-pacedDirect.p50).Microseconds())/1000, ms(pacedDirect.p50))

	fmt.Print(report.String())
	check(os.WriteFile(filepath.Join(*outDir, "results.md"), []byte(report.String()), 0o644))
	check(os.WriteFile(filepath.Join(*outDir, "results.svg"), plot(curve, direct, socat), 0o644))

	// 6. Host mode: many consoles in one process, against one process
	// per console. Its own file: it is run on its own too (-only host).
	writeHost(hostMode())
}

// writeHost prints the host-mode figures and writes them to
// results-host.md.
func writeHost(f hostFigures) {
	r := f.report()
	fmt.Print(r)
	check(os.WriteFile(filepath.Join(*outDir, "results-host.md"), []byte(r), 0o644))
}

// roundFor keeps the lossless run at N=1000 within a few seconds.
func roundFor(n int) uint64 {
	if n >= 1000 {
		return 4 << 20
	}
	return 32 << 20
}

type streamCfg struct {
	round   uint64 // when set: send this much, time until all have it
	name    string
	target  string // proxy, direct, socat
	clients int
	stuck   int
	rate    int // bytes/s; 0 floods
	dur     time.Duration
	args    []string
	latency bool
}

type result struct {
	name                 string
	perClient, aggregate float64 // MiB/s
	announced, silent    uint64
	p50, p99             time.Duration // round trips while the stream flows
	qp50, qp99           time.Duration // round trips one at a time, after it
	rssPeak              int           // KiB, of the relay process
	cpu                  float64
	delivered            uint64
	dur                  time.Duration
}

// selected reports whether -only selects the scenario called name.
func selected(name string) bool {
	for _, s := range strings.Split(*only, ",") {
		if strings.Contains(name, s) {
			return true
		}
	}
	return false
}

func run(cfg streamCfg) result {
	if *only != "" && !selected(cfg.name) {
		return result{name: cfg.name}
	}
	dir, err := os.MkdirTemp("", "cpb-")
	check(err)
	defer os.RemoveAll(dir)
	vmmPath, sock := filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "c.sock")
	chunk := 64 << 10
	if cfg.rate > 0 {
		chunk = 4 << 10 // a paced console arrives in small pieces
	}
	v, err := startVMM(vmmPath, cfg.rate, chunk, cfg.round)
	check(err)
	defer v.close()
	var relay *exec.Cmd
	switch cfg.target {
	case "direct":
		sock = vmmPath
	case "socat":
		relay = exec.Command("socat", "UNIX-LISTEN:"+sock+",fork", "UNIX-CONNECT:"+vmmPath)
	case "proxy":
		relay = exec.Command(*binary, append([]string{"--upstream", "unix:" + vmmPath, "--listen", sock, "--max-clients", "2000", "--log-level", "warn"}, cfg.args...)...)
	}
	if relay != nil {
		relay.Stderr = os.Stderr
		check(relay.Start())
		defer func() { relay.Process.Kill(); relay.Wait() }()
		waitSocket(sock)
	}
	for range cfg.stuck {
		c, err := net.Dial("unix", sock)
		check(err)
		defer c.Close()
	}
	clients := make([]*client, cfg.clients)
	for i := range clients {
		c, err := net.Dial("unix", sock)
		check(err)
		clients[i] = &client{conn: c}
	}
	clients[0].echoes = map[uint64]time.Time{}
	clients[0].echoed = make(chan uint64, 1)
	close(v.begin)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Go(func() { c.run(64<<10, 0, stop) })
	}
	// Warm up, then measure. A round is measured from its first byte.
	if cfg.round == 0 {
		time.Sleep(300 * time.Millisecond)
	}
	before := make([]uint64, len(clients))
	for i, c := range clients {
		c.mu.Lock()
		before[i] = c.bytes
		c.mu.Unlock()
	}
	var pid int
	if relay != nil {
		pid = relay.Process.Pid
	}
	cpu0 := cpuTicks(pid)
	start := time.Now()
	sent := map[uint64]time.Time{}
	var seq uint64
	done := func() bool {
		if cfg.round == 0 {
			return time.Since(start) >= cfg.dur
		}
		for _, c := range clients {
			c.mu.Lock()
			got := c.bytes
			c.mu.Unlock()
			if got < cfg.round {
				return false
			}
		}
		return true
	}
	for !done() {
		if time.Since(start) > 2*time.Minute {
			check(fmt.Errorf("%s: the round did not complete", cfg.name))
		}
		time.Sleep(2 * time.Millisecond)
		if cfg.latency && (seq == 0 || time.Since(sent[seq]) >= 10*time.Millisecond) {
			seq++
			sent[seq] = time.Now()
			clients[0].conn.Write([]byte{'x'})
		}
	}
	elapsed := time.Since(start)
	cpu := float64(cpuTicks(pid)-cpu0) / 100
	r := result{name: cfg.name, cpu: cpu, dur: elapsed, rssPeak: rssKiB(pid, "VmHWM:")}
	var total uint64
	for i, c := range clients {
		c.mu.Lock()
		total += c.bytes - before[i]
		r.announced += c.announced
		r.silent += c.silent
		c.mu.Unlock()
	}
	close(v.quiet)
	time.Sleep(100 * time.Millisecond) // the last echoes
	clients[0].mu.Lock()
	var rtts []time.Duration
	for s, t := range sent {
		if got, ok := clients[0].echoes[s]; ok {
			rtts = append(rtts, got.Sub(t))
		}
	}
	clients[0].mu.Unlock()
	if len(rtts) > 0 && cfg.latency {
		slices.Sort(rtts)
		r.p50, r.p99 = rtts[len(rtts)/2], rtts[len(rtts)*99/100]
	}
	if cfg.latency {
		settle(clients)
		r.qp50, r.qp99 = quietRoundTrips(clients[0], quietRounds, &seq)
	}
	close(stop)
	for _, c := range clients {
		c.conn.Close()
	}
	wg.Wait()
	r.delivered = total
	r.aggregate = float64(total) / (1 << 20) / elapsed.Seconds()
	r.perClient = r.aggregate / float64(cfg.clients)
	fmt.Fprintf(os.Stderr, "%-58s %6.0f MiB/s per client %6.0f aggregate, p50 %s p99 %s, quiet p50 %s p99 %s, CPU %s s/GiB\n", cfg.name, r.perClient, r.aggregate, ms(r.p50), ms(r.p99), us(r.qp50), us(r.qp99), cpuPerGiB(r))
	return r
}

// quietRounds is how many round trips quietRoundTrips makes, as many as
// a test harness waiting for a prompt after each command might.
const quietRounds = 2000

// settle waits until the clients have read everything, so that round trips
// made next queue behind nothing.
func settle(clients []*client) {
	prev := ^uint64(0)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		var total uint64
		for _, c := range clients {
			c.mu.Lock()
			total += c.bytes
			c.mu.Unlock()
		}
		if total == prev {
			return
		}
		prev = total
	}
	check(fmt.Errorf("the clients did not settle"))
}

// quietRoundTrips sends n keystrokes through c, each once the echo of the
// one before has arrived, as a program that drives a console does, and
// returns the round trips' p50 and p99. seq numbers the keystrokes sent on
// c's connection so far.
func quietRoundTrips(c *client, n int, seq *uint64) (p50, p99 time.Duration) {
	rtts := make([]time.Duration, 0, n)
	for range n {
		select {
		case <-c.echoed: // an echo from before: room for the next
		default:
		}
		*seq++
		want := *seq
		start := time.Now()
		_, err := c.conn.Write([]byte{'x'})
		check(err)
		timeout := time.After(5 * time.Second)
		for got := uint64(0); got != want; {
			select {
			case got = <-c.echoed:
			case <-timeout:
				check(fmt.Errorf("echo %d did not arrive", want))
			}
		}
		c.mu.Lock()
		rtts = append(rtts, c.echoes[want].Sub(start))
		c.mu.Unlock()
	}
	slices.Sort(rtts)
	return rtts[n/2], rtts[n*99/100]
}

func idleAndMemory() (ticks int, rss0, rss100, rss1000 int) {
	dir, err := os.MkdirTemp("", "cpb-")
	check(err)
	defer os.RemoveAll(dir)
	vmmPath, sock := filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "c.sock")
	v, err := startVMM(vmmPath, -1, 4096, 0) // connected, silent
	check(err)
	defer v.close()
	relay := exec.Command(*binary, "--upstream", "unix:"+vmmPath, "--listen", sock, "--max-clients", "2000", "--log-level", "warn")
	relay.Stderr = os.Stderr
	check(relay.Start())
	defer func() { relay.Process.Kill(); relay.Wait() }()
	waitSocket(sock)
	pid := relay.Process.Pid
	settle := func() int { time.Sleep(500 * time.Millisecond); return rssKiB(pid, "VmRSS:") }
	rss0 = settle()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	connect := func(n int) {
		for range n {
			c, err := net.Dial("unix", sock)
			check(err)
			conns = append(conns, c)
		}
	}
	connect(100)
	rss100 = settle()
	t0 := cpuTicks(pid)
	time.Sleep(10 * time.Second)
	ticks = cpuTicks(pid) - t0
	connect(900)
	rss1000 = settle()
	return
}

func attachDelay(n int) (median, p90 time.Duration) {
	dir, err := os.MkdirTemp("", "cpb-")
	check(err)
	defer os.RemoveAll(dir)
	vmmPath, sock := filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "c.sock")
	relay := exec.Command(*binary, "--upstream", "unix:"+vmmPath, "--listen", sock, "--log-level", "warn")
	check(relay.Start())
	defer func() { relay.Process.Kill(); relay.Wait() }()
	waitSocket(sock)
	var delays []time.Duration
	for range n {
		time.Sleep(100 * time.Millisecond) // the proxy is waiting, its backoff grown
		start := time.Now()
		ln, err := net.Listen("unix", vmmPath)
		check(err)
		c, err := ln.Accept()
		check(err)
		delays = append(delays, time.Since(start))
		c.Close()
		ln.Close() // removes the socket, as a VMM that exits does
	}
	slices.Sort(delays)
	return delays[len(delays)/2], delays[len(delays)*9/10]
}

func waitSocket(path string) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	check(fmt.Errorf("%s did not appear", path))
}

// cpuTicks returns the CPU time of pid and its live children (socat's
// fork does the relaying in a child).
func cpuTicks(pid int) int {
	if pid == 0 {
		return 0
	}
	total := 0
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		self, _ := strconv.Atoi(e.Name())
		ppid, _ := strconv.Atoi(f[1])
		if self == pid || ppid == pid {
			u, _ := strconv.Atoi(f[11])
			s, _ := strconv.Atoi(f[12])
			total += u + s
		}
	}
	return total
}

func rssKiB(pid int, field string) int {
	if pid == 0 {
		return 0
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return 0
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "unknown CPU"
}

func cpuCount() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}

func ms(d time.Duration) string {
	if d == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000)
}

func us(d time.Duration) string {
	if d == 0 {
		return "–"
	}
	return fmt.Sprintf("%d µs", d.Microseconds())
}

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

func kib(k int) string {
	if k == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f MiB", float64(k)/1024)
}

func cpuPerGiB(r result) string {
	if r.cpu == 0 && r.rssPeak == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", r.cpu/(float64(r.delivered)/(1<<30)))
}

func pct(r result) string {
	if r.rssPeak == 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f", 100*r.cpu/r.dur.Seconds())
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
