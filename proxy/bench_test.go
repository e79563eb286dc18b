package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
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
