package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/unixsock"
)

// BenchmarkAttachAfterSocketAppears measures how long the proxy takes to
// connect once a VMM's socket appears: from the VMM creating it (and, in
// the dir-missing case, its directory) to the VMM's accept returning the
// proxy's connection. Each iteration starts a proxy that waits for the
// socket, as one started before its VM does.
func BenchmarkAttachAfterSocketAppears(b *testing.B) {
	b.Run("dir-exists", func(b *testing.B) { benchmarkAttach(b, true) })
	b.Run("dir-missing", func(b *testing.B) { benchmarkAttach(b, false) })
}

func benchmarkAttach(b *testing.B, dirExists bool) {
	dir := b.TempDir()
	var delays []time.Duration
	i := 0
	for b.Loop() {
		b.StopTimer()
		i++
		sockDir := filepath.Join(dir, fmt.Sprint(i))
		path := filepath.Join(sockDir, "vmm.sock")
		if dirExists {
			if err := mkdir(sockDir); err != nil {
				b.Fatal(err)
			}
		}
		p, err := New(Config{Upstream: &UnixUpstream{Path: path}})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { p.RunUpstream(ctx) })
		// Let the first attempt fail and the backoff grow past the
		// interesting range, so only the watch can make the attach fast.
		time.Sleep(50 * time.Millisecond)
		b.StartTimer()

		start := time.Now()
		if !dirExists {
			if err := mkdir(sockDir); err != nil {
				b.Fatal(err)
			}
		}
		l, err := net.Listen("unix", path)
		if err != nil {
			b.Fatal(err)
		}
		conn, err := l.Accept()
		if err != nil {
			b.Fatal(err)
		}
		delays = append(delays, time.Since(start))

		b.StopTimer()
		conn.Close()
		cancel()
		wg.Wait()
		l.Close()
		p.Close()
		b.StartTimer()
	}
	slices.Sort(delays)
	b.ReportMetric(float64(delays[len(delays)/2].Microseconds()), "µs-median-attach")
	b.ReportMetric(float64(delays[len(delays)*99/100].Microseconds()), "µs-p99-attach")
}

func mkdir(dir string) error { return os.Mkdir(dir, 0o755) }

// BenchmarkFanout measures the hot path, upstream read → ring → client
// writes, over real Unix sockets: one op is one 64 KiB chunk from the VMM
// delivered to every client. allocs/op shows that the path allocates
// nothing per chunk.
func BenchmarkFanout(b *testing.B) {
	for _, n := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) { benchmarkFanout(b, n) })
	}
}

func benchmarkFanout(b *testing.B, clients int) {
	const chunk = 64 << 10
	dir := b.TempDir()
	vmmLn, err := net.Listen("unix", filepath.Join(dir, "vmm.sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer vmmLn.Close()
	// A ring far larger than the run, so that no client ever skips.
	p, err := New(Config{Upstream: &UnixUpstream{Path: filepath.Join(dir, "vmm.sock")}, BufferSize: MaxBufferSize / 4, Replay: ReplayNone, MaxClients: clients})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := unixsock.Listen(filepath.Join(dir, "c.sock"), unixsock.SocketOptions{})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { p.RunUpstream(ctx) })
	wg.Go(func() { p.Serve(ln) })
	vmm, err := vmmLn.Accept()
	if err != nil {
		b.Fatal(err)
	}
	// Clients join after the connected notice, so that with no replay they
	// receive exactly what the VMM writes.
	for {
		p.mu.Lock()
		end := p.ring.End()
		p.mu.Unlock()
		if end > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	var received sync.WaitGroup
	counts := make([]atomic.Int64, clients)
	conns := make([]net.Conn, clients)
	for i := range clients {
		if conns[i], err = net.Dial("unix", filepath.Join(dir, "c.sock")); err != nil {
			b.Fatal(err)
		}
	}
	for p.Stats().ClientsServed < uint64(clients) {
		time.Sleep(time.Millisecond)
	}
	data := make([]byte, chunk)
	for i := range data {
		data[i] = byte('a' + i%26)
	}
	// The notice sent at connect is already in the ring: count from now.
	var want int64
	start := func() {
		for i, c := range conns {
			received.Go(func() {
				buf := make([]byte, 64<<10)
				for counts[i].Load() < want {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					counts[i].Add(int64(n))
				}
			})
		}
	}
	want = int64(b.N) * chunk
	b.SetBytes(chunk * int64(clients))
	b.ReportAllocs()
	b.ResetTimer()
	start()
	for i := range b.N {
		// Stay well within the ring of the slowest client: the benchmark is
		// about the path, not about skipping.
		for sent := int64(i) * chunk; ; runtime.Gosched() {
			slowest := want
			for j := range counts {
				slowest = min(slowest, counts[j].Load())
			}
			if sent-slowest < 64<<20 {
				break
			}
		}
		if _, err := vmm.Write(data); err != nil {
			b.Fatal(err)
		}
	}
	received.Wait()
	b.StopTimer()
	for i := range counts {
		if c := counts[i].Load(); c != want {
			b.Fatalf("client %d received %d bytes, want %d", i, c, want)
		}
	}
	cancel()
	vmm.Close()
	for _, c := range conns {
		c.Close()
	}
	p.Close()
	wg.Wait()
}
