package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/unixsock"
	"go.uber.org/goleak"
)

// The keystroke the typist sends and the echo VMM returns. The stream never
// holds it, so its first appearance in what the typist reads is the echo.
const keystroke = 'k'

// Pacing of the stream that flows in the stream=paced cases: small pieces,
// closer together than coalesceWindow, as a console that prints steadily
// sends them. It is slow enough that 100 readers in this process keep up
// with it on two cores.
const (
	pacedPiece    = 1 << 10
	pacedInterval = 250 * time.Microsecond
)

// BenchmarkKeystroke measures a keystroke's round trip: one op is one byte
// written by a read-write client, echoed by a VMM over a real Unix socket,
// until that client has read the echo. With clients=100 the other 99 read
// everything, as viewers do; with stream=paced the VMM also streams output
// in small pieces, so that the echo arrives while output flows. relay=none
// is the same client connected straight to the VMM: the floor. ns/op is
// the mean round trip; p50 and p99 are reported too.
func BenchmarkKeystroke(b *testing.B) {
	for _, stream := range []bool{false, true} {
		name := "stream=none"
		if stream {
			name = "stream=paced"
		}
		b.Run("relay=none/clients=1/"+name, func(b *testing.B) { benchmarkKeystroke(b, 0, stream) })
		for _, n := range []int{1, 100} {
			b.Run(fmt.Sprintf("relay=proxy/clients=%d/%s", n, name), func(b *testing.B) { benchmarkKeystroke(b, n, stream) })
		}
	}
}

// benchmarkKeystroke runs the round trips through a proxy with clients
// clients, or, with clients == 0, straight to the VMM.
func benchmarkKeystroke(b *testing.B, clients int, stream bool) {
	defer goleak.VerifyNone(b, goleak.IgnoreCurrent())
	dir := b.TempDir()
	vmmPath := filepath.Join(dir, "vmm.sock")
	vmm := startEchoVMM(b, vmmPath, stream)
	defer vmm.close()

	var typist net.Conn
	var viewers sync.WaitGroup
	if clients == 0 {
		var err error
		if typist, err = net.Dial("unix", vmmPath); err != nil {
			b.Fatal(err)
		}
	} else {
		p, err := New(Config{Upstream: &UnixUpstream{Path: vmmPath}, Replay: ReplayNone, MaxClients: clients})
		if err != nil {
			b.Fatal(err)
		}
		sock := filepath.Join(dir, "c.sock")
		ln, err := unixsock.Listen(sock, unixsock.SocketOptions{})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() { p.RunUpstream(ctx) })
		wg.Go(func() { p.Serve(ln) })
		conns := make([]net.Conn, 0, clients)
		defer func() {
			for _, c := range conns {
				c.Close() // ends the viewers' copies
			}
			viewers.Wait()
			cancel()
			p.Close()
			wg.Wait()
		}()
		for range clients {
			c, err := net.Dial("unix", sock)
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		for p.Stats().ClientsServed < uint64(clients) {
			time.Sleep(time.Millisecond)
		}
		typist = conns[0]
		for _, c := range conns[1:] {
			viewers.Go(func() { io.Copy(io.Discard, c) })
		}
	}
	defer typist.Close()

	buf := make([]byte, 64<<10)
	roundTrip := func() time.Duration {
		start := time.Now()
		if _, err := typist.Write([]byte{keystroke}); err != nil {
			b.Fatal(err)
		}
		typist.SetReadDeadline(time.Now().Add(waitTimeout))
		for {
			n, err := typist.Read(buf)
			if bytes.IndexByte(buf[:n], keystroke) >= 0 {
				return time.Since(start)
			}
			if err != nil {
				b.Fatalf("waiting for the echo: %v", err)
			}
		}
	}
	// The first round trip waits for the proxy to connect to the VMM; a
	// few more let the stream and the viewers settle.
	for range 10 {
		roundTrip()
	}
	var rtts []time.Duration
	for b.Loop() {
		rtts = append(rtts, roundTrip())
	}
	slices.Sort(rtts)
	b.ReportMetric(float64(rtts[len(rtts)/2].Nanoseconds())/1e3, "µs-p50")
	b.ReportMetric(float64(rtts[len(rtts)*99/100].Nanoseconds())/1e3, "µs-p99")
}

// echoVMM is a console that writes every byte it reads straight back,
// and, when streaming, a paced stream that never holds the keystroke. Each
// Write is whole, so an echo never splits a piece of the stream.
type echoVMM struct {
	ln   net.Listener
	stop chan struct{}
	wg   sync.WaitGroup
}

func startEchoVMM(b *testing.B, path string, stream bool) *echoVMM {
	ln, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	v := &echoVMM{ln: ln, stop: make(chan struct{})}
	piece := bytes.Repeat([]byte("0123456789abcde\n"), pacedPiece/16)
	v.wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			v.wg.Go(func() {
				<-v.stop
				conn.Close()
			})
			v.wg.Go(func() {
				buf := make([]byte, 4<<10)
				for {
					n, err := conn.Read(buf)
					if n > 0 {
						conn.Write(buf[:n])
					}
					if err != nil {
						return
					}
				}
			})
			if stream {
				v.wg.Go(func() { v.streamTo(conn, piece) })
			}
		}
	})
	return v
}

// streamTo writes piece every pacedInterval on average until stopped.
func (v *echoVMM) streamTo(conn net.Conn, piece []byte) {
	start := time.Now()
	for sent := time.Duration(0); ; sent += pacedInterval {
		if wait := sent - time.Since(start); wait > 0 {
			select {
			case <-v.stop:
				return
			case <-time.After(wait):
			}
		}
		if _, err := conn.Write(piece); err != nil {
			return
		}
	}
}

func (v *echoVMM) close() {
	close(v.stop)
	v.ln.Close()
	v.wg.Wait()
}
