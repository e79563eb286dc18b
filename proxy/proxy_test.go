package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var connectedNotice = notice(noticeConnected, true)

// startPair starts a proxy and a fake VMM on its upstream path and waits
// until they are connected.
func startPair(t *testing.T, cfg Config) (*testProxy, *fakeVMM) {
	t.Helper()
	p, dir := startProxy(t, cfg)
	vmm := startVMM(t, filepath.Join(dir, "vmm.sock"))
	waitFor(t, "the proxy to connect to the VMM", func() bool { return vmm.Accepted() == 1 })
	return p, vmm
}

// feed writes b to the VMM and waits until the proxy's ring has taken in
// everything up to it.
func feed(t *testing.T, p *testProxy, vmm *fakeVMM, b []byte) {
	t.Helper()
	want := p.ringEnd() + uint64(len(b))
	if !vmm.Write(b) {
		t.Fatal("VMM has no connection to write to")
	}
	waitFor(t, "the ring to take in the output", func() bool { return p.ringEnd() >= want })
}

func TestLateClientGetsHistoryThenLive(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	waitFor(t, "the connected notice", func() bool { return p.ringEnd() == uint64(len(connectedNotice)) })
	history := pattern(0, 200<<10)
	feed(t, p, vmm, history)

	want := append(bytes.Clone(connectedNotice), history...)
	first := dial(t, p)
	if got := readN(t, first, nil, len(want)); !bytes.Equal(got, want) {
		t.Fatalf("first client's replay differs: got %d bytes, want %d", len(got), len(want))
	}
	live := pattern(200<<10, 4<<10)
	vmm.Write(live)
	want = append(want, live...)
	if got := readN(t, first, want[:len(want)-len(live)], len(want)); !bytes.Equal(got, want) {
		t.Fatalf("first client's live output differs: tail %q", tail(got))
	}

	second := dial(t, p)
	if got := readN(t, second, nil, len(want)); !bytes.Equal(got, want) {
		t.Fatalf("second client's replay differs: got %d bytes, want %d", len(got), len(want))
	}
}

func TestClientsJoiningMidStreamGetOneContiguousRun(t *testing.T) {
	checkLeaks(t)
	// The replay size is not a multiple of the line length, so every join
	// exercises the move to a line start as well as the replay/live seam.
	const (
		total    = 8 << 20
		chunk    = 64 << 10
		clients  = 8
		maxAhead = 1 << 20 // the VMM waits for the slowest client beyond this
	)
	p, vmm := startPair(t, Config{BufferSize: 4 << 20, Replay: 100_000})
	rng := rand.New(rand.NewPCG(1, 2))
	joinAt := make([]uint64, clients)
	for i := range joinAt {
		joinAt[i] = uint64(rng.IntN(total/chunk)) * chunk
	}

	var (
		progress [clients]atomic.Uint64 // stream bytes each joined client has seen
		joined   [clients]atomic.Bool
		wg       sync.WaitGroup
		results  = make([][]byte, clients)
	)
	defer wg.Wait()
	for off := uint64(0); off < total; off += chunk {
		for i := range clients {
			if joinAt[i] != off {
				continue
			}
			conn := dial(t, p)
			joined[i].Store(true)
			progress[i].Store(off)
			wg.Go(func() {
				conn.SetReadDeadline(timeNowPlusWait())
				buf := make([]byte, 64<<10)
				var got []byte
				for {
					n, err := conn.Read(buf)
					got = append(got, buf[:n]...)
					data, _ := splitNotices(got)
					if len(data) >= patternLine {
						last := data[len(data)/patternLine*patternLine-patternLine:]
						at, _ := lineOffset(last)
						progress[i].Store(at + patternLine)
						if at+patternLine >= total {
							break
						}
					}
					if err != nil {
						break
					}
				}
				results[i] = got
			})
		}
		for i := range clients {
			waitFor(t, "clients to keep up", func() bool {
				return !joined[i].Load() || progress[i].Load()+maxAhead > off
			})
		}
		// Let the ring take the chunk in before anyone joins, so a join's
		// replay point is known exactly.
		feed(t, p, vmm, pattern(off, chunk))
	}
	wg.Wait()
	for i, got := range results {
		data, notices := splitNotices(got)
		if len(notices) > 1 || (len(notices) == 1 && notices[0] != noticeConnected) {
			t.Errorf("client %d got notices %q", i, notices)
		}
		first, end := checkContiguous(t, data)
		if end != total {
			t.Errorf("client %d ends at %d, want %d", i, end, total)
		}
		// The replay starts 100000 bytes back, moved to the next line: the
		// ring's offsets run ahead of the pattern's by the connected notice,
		// which a late joiner no longer receives.
		if joinAt[i] >= 100_000 {
			want := (joinAt[i] - 100_000 + patternLine - 1) / patternLine * patternLine
			if first != want || len(notices) != 0 {
				t.Errorf("client %d joined at %d: replay starts at %d with notices %q, want %d", i, joinAt[i], first, notices, want)
			}
		}
	}
}

func TestClientsReceiveIdenticalBytesAndInputArrivesWhole(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	conns := []net.Conn{dial(t, p), dial(t, p), dial(t, p)}
	out := pattern(0, 512<<10)
	for off := 0; off < len(out); off += 32 << 10 {
		vmm.Write(out[off : off+32<<10])
	}
	want := append(bytes.Clone(connectedNotice), out...)
	for i, c := range conns {
		if got := readN(t, c, nil, len(want)); !bytes.Equal(got, want) {
			t.Errorf("client %d received different bytes", i)
		}
	}

	// Two clients type at once. Every message holds bytes a translating or
	// interleaving proxy would disturb: CR, LF, NUL, 0xff.
	const messages = 100
	msg := func(client, i int) []byte {
		return fmt.Appendf(nil, "<%c%03d\r\n\n\x00\xff\r%s>", 'A'+client, i, bytes.Repeat([]byte{byte('a' + client)}, 40))
	}
	var wg sync.WaitGroup
	for c := range 2 {
		wg.Go(func() {
			for i := range messages {
				m := msg(c, i)
				if _, err := conns[c].Write(m); err != nil {
					t.Errorf("client %d write: %v", c, err)
					return
				}
				// One message per read: wait until it arrived before the next.
				for !bytes.Contains(vmm.Input(), m) {
					runtime.Gosched()
				}
			}
		})
	}
	wg.Wait()
	in := vmm.Input()
	var a, b []byte
	for i := range messages {
		a = append(a, msg(0, i)...)
		b = append(b, msg(1, i)...)
	}
	if len(in) != len(a)+len(b) {
		t.Fatalf("VMM received %d input bytes, want %d", len(in), len(a)+len(b))
	}
	// Take whole messages off the front: each must be the next one of
	// either client, which fails on any split, interleaving or change.
	for rest := in; len(rest) > 0; {
		switch {
		case len(a) > 0 && bytes.HasPrefix(rest, a[:len(msg(0, 0))]):
			rest, a = rest[len(msg(0, 0)):], a[len(msg(0, 0)):]
		case len(b) > 0 && bytes.HasPrefix(rest, b[:len(msg(1, 0))]):
			rest, b = rest[len(msg(1, 0)):], b[len(msg(1, 0)):]
		default:
			t.Fatalf("input is not whole messages in client order at %d: %q", len(in)-len(rest), tail(rest))
		}
	}
}

func TestVMMRestartKeepsClientsAttached(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	conn := dial(t, p)
	feed(t, p, vmm, []byte("first boot\n"))
	got := readUntil(t, conn, nil, "first boot", func(b []byte) bool { return bytes.Contains(b, []byte("first boot\n")) })

	vmm.Kill()
	vmm2 := startVMM(t, vmm.path)
	waitFor(t, "the proxy to reconnect", func() bool { return vmm2.Accepted() == 1 })
	feed(t, p, vmm2, []byte("second boot\n"))
	got = readUntil(t, conn, got, "second boot", func(b []byte) bool { return bytes.Contains(b, []byte("second boot\n")) })

	data, notices := splitNotices(got)
	if string(data) != "first boot\nsecond boot\n" {
		t.Errorf("data = %q", data)
	}
	want := []string{noticeConnected, noticeLost("EOF"), noticeConnected}
	if fmt.Sprint(notices) != fmt.Sprint(want) {
		t.Errorf("notices = %q, want %q", notices, want)
	}
}

func TestWaitsForUpstreamAndDiscardsInputMeanwhile(t *testing.T) {
	checkLeaks(t)
	p, dir := startProxy(t, Config{})
	conn := dial(t, p)
	if _, err := conn.Write([]byte("typed while down\n")); err != nil {
		t.Fatal(err)
	}
	// The input is discarded and counted before the VMM exists.
	waitFor(t, "the input to be discarded", func() bool {
		p.inputMu.Lock()
		defer p.inputMu.Unlock()
		return p.discardedDown == uint64(len("typed while down\n"))
	})
	vmm := startVMM(t, filepath.Join(dir, "vmm.sock"))
	waitFor(t, "the proxy to connect", func() bool { return vmm.Accepted() == 1 })
	feed(t, p, vmm, []byte("hello\n"))
	got := readUntil(t, conn, nil, "hello", func(b []byte) bool { return bytes.HasSuffix(b, []byte("hello\n")) })
	if want := string(connectedNotice) + "hello\n"; string(got) != want {
		t.Errorf("got %q, want %q", got, want)
	}
	conn.Write([]byte("ls\n"))
	waitFor(t, "input to reach the VMM", func() bool { return string(vmm.Input()) == "ls\n" })
}

func TestStuckClientSkipsWithExactCountAndSlowsNobody(t *testing.T) {
	checkLeaks(t)
	const (
		// Not a multiple of the pattern's line length, so the oldest retained
		// byte is mid-line and the skip must move to a line start.
		ringSize = 1<<20 + 5
		total    = 64 << 20
		chunk    = 64 << 10
	)
	p, vmm := startPair(t, Config{BufferSize: ringSize})
	stuck := dial(t, p)
	reader := dial(t, p)

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	// The reading client must see every byte; the VMM never gets more than
	// half a ring ahead of it, so any loss would be the proxy's.
	var seen atomic.Uint64
	var readerDone atomic.Bool
	var readerGot []byte
	var wg sync.WaitGroup
	wg.Go(func() {
		defer readerDone.Store(true)
		buf := make([]byte, 64<<10)
		var carry []byte
		for seen.Load() < total {
			reader.SetReadDeadline(timeNowPlusWait())
			n, err := reader.Read(buf)
			carry = append(carry, buf[:n]...)
			data, notices := splitNotices(carry)
			if len(notices) > 1 {
				readerGot = carry
				return
			}
			whole := len(data) / patternLine * patternLine
			if whole > 0 {
				first, end := checkContiguousNoFatal(data[:whole])
				if first != seen.Load() || end == 0 {
					readerGot = carry
					return
				}
				seen.Store(end)
				carry = data[whole:]
			} else {
				carry = data
			}
			if err != nil {
				return
			}
		}
	})
	for off := uint64(0); off < total; off += chunk {
		waitFor(t, "the reading client", func() bool { return seen.Load()+ringSize/2 > off || readerDone.Load() })
		if readerDone.Load() {
			break
		}
		vmm.Write(pattern(off, chunk))
	}
	wg.Wait()
	if seen.Load() != total {
		t.Fatalf("reading client saw %d contiguous bytes of %d; tail %q", seen.Load(), total, tail(readerGot))
	}

	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > 4<<20 {
		t.Errorf("heap grew by %d bytes while streaming %d bytes past a stuck client", grew, total)
	}

	// The stuck client now reads: whatever its socket buffered, then one
	// notice whose count is exactly the gap in the pattern.
	got := readUntil(t, stuck, nil, "the drop notice and the end of the stream", func(b []byte) bool {
		return bytes.HasSuffix(b, pattern(total-patternLine, patternLine))
	})
	data, notices := splitNotices(got)
	if countPrefix(notices, "") != 2 || notices[0] != noticeConnected {
		t.Fatalf("stuck client notices = %q, want connected then one drop", notices)
	}
	var dropped uint64
	if _, err := fmt.Sscanf(notices[1], "%d bytes dropped", &dropped); err != nil {
		t.Fatalf("second notice %q is not a drop notice", notices[1])
	}
	i := bytes.Index(got, []byte(noticePrefix+notices[1]))
	beforeNotice, _ := splitNotices(got[:i])
	_, gapStart := checkContiguous(t, bytes.TrimSuffix(beforeNotice, []byte("\r\n")))
	afterNotice := got[i+len(noticePrefix)+len(notices[1])+2:]
	gapEnd, end := checkContiguous(t, afterNotice)
	if end != total {
		t.Errorf("stuck client's stream ends at %d, want %d", end, total)
	}
	if gapEnd-gapStart != dropped {
		t.Errorf("notice says %d bytes dropped, the pattern skips %d (from %d to %d)", dropped, gapEnd-gapStart, gapStart, gapEnd)
	}
	if len(data) == 0 {
		t.Error("stuck client received no data")
	}
}

// checkContiguousNoFatal is checkContiguous for goroutines that may not call
// t.Fatal: it returns end 0 on any gap.
func checkContiguousNoFatal(data []byte) (first, end uint64) {
	for i := 0; i < len(data); i += patternLine {
		off, ok := lineOffset(data[i:])
		if !ok {
			return 0, 0
		}
		if i == 0 {
			first = off
		} else if off != first+uint64(i) {
			return first, 0
		}
	}
	return first, first + uint64(len(data))
}

func TestSlowClientDisconnectPolicy(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{BufferSize: MinBufferSize * 4, SlowClient: SlowClientDisconnect})
	stuck := dial(t, p)
	// Far more than the ring and the socket buffers can hold.
	for off := uint64(0); off < 16<<20; off += 64 << 10 {
		vmm.Write(pattern(off, 64<<10))
	}
	waitFor(t, "the stuck client to be closed", func() bool { return p.clientCount() == 0 })
	// It receives what its socket had buffered, then EOF, and no notice.
	data, notices := splitNotices(readUntilEOF(t, stuck))
	if len(notices) != 1 || notices[0] != noticeConnected {
		t.Errorf("disconnected client got notices %q, want only the connected one", notices)
	}
	if first, _ := checkContiguous(t, data); first != 0 {
		t.Errorf("disconnected client's data starts at %d, want 0", first)
	}
}

func TestTooManyClientsAreRefused(t *testing.T) {
	checkLeaks(t)
	p, _ := startPair(t, Config{MaxClients: 2})
	dial(t, p)
	dial(t, p)
	conn, err := net.Dial("unix", p.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := readUntilEOF(t, conn)
	if want := "[consoleproxy] too many clients (max 2)\r\n"; string(got) != want {
		t.Errorf("refused client got %q, want %q", got, want)
	}
	if n := p.clientCount(); n != 2 {
		t.Errorf("%d clients after refusal, want 2", n)
	}
}

func TestReplayPolicies(t *testing.T) {
	checkLeaks(t)
	for _, tc := range []struct {
		name   string
		replay ReplaySize
		want   string
	}{
		{"none", ReplayNone, "live\n"},
		{"size cut mid-line moves to the next line", 10, "line3\nlive\n"},
		{"size at a line start", 12, "line2\nline3\nlive\n"},
		{"size beyond the history", 1 << 20, "[consoleproxy] upstream connected\r\nline1\nline2\nline3\nlive\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, vmm := startPair(t, Config{Replay: tc.replay})
			feed(t, p, vmm, []byte("line1\nline2\nline3\n"))
			conn := dial(t, p)
			feed(t, p, vmm, []byte("live\n"))
			got := readUntil(t, conn, nil, "live", func(b []byte) bool { return bytes.HasSuffix(b, []byte("live\n")) })
			if string(got) != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestNoticesOffAndFraming(t *testing.T) {
	checkLeaks(t)
	t.Run("off", func(t *testing.T) {
		p, vmm := startPair(t, Config{DisableNotices: true})
		feed(t, p, vmm, []byte("partial"))
		conn := dial(t, p)
		vmm.Kill()
		vmm2 := startVMM(t, vmm.path)
		waitFor(t, "reconnect", func() bool { return vmm2.Accepted() == 1 })
		feed(t, p, vmm2, []byte(" line\n"))
		got := readUntil(t, conn, nil, "the line", func(b []byte) bool { return bytes.HasSuffix(b, []byte("line\n")) })
		if string(got) != "partial line\n" {
			t.Errorf("got %q with notices off", got)
		}
	})
	t.Run("mid-line notice starts a new line", func(t *testing.T) {
		p, vmm := startPair(t, Config{})
		feed(t, p, vmm, []byte("login: "))
		conn := dial(t, p)
		vmm.Kill()
		got := readUntil(t, conn, nil, "the lost notice", func(b []byte) bool { return bytes.HasSuffix(b, []byte("EOF\r\n")) })
		if want := "[consoleproxy] upstream connected\r\nlogin: \r\n[consoleproxy] upstream lost: EOF\r\n"; string(got) != want {
			t.Errorf("got %q, want %q", got, want)
		}
	})
}

func TestHalfClosedClientKeepsReceiving(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{Replay: ReplayNone})
	conn := dial(t, p).(*net.UnixConn)
	conn.Write([]byte("uname -a\n"))
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the command to reach the VMM", func() bool { return string(vmm.Input()) == "uname -a\n" })
	vmm.Write([]byte("Linux guest\n"))
	got := readUntil(t, conn, nil, "the answer", func(b []byte) bool { return bytes.Contains(b, []byte("Linux guest\n")) })
	if string(got) != "Linux guest\n" {
		t.Errorf("got %q", got)
	}
}

func TestHungUpClientIsReleasedWithoutOutput(t *testing.T) {
	checkLeaks(t)
	p, _ := startPair(t, Config{})
	for range 20 {
		conn := dial(t, p)
		conn.Close()
	}
	waitFor(t, "hung-up clients to be released", func() bool { return p.clientCount() == 0 })
}

func TestHalfClosedThenClosedClientIsReleasedWithoutOutput(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	conn := dial(t, p).(*net.UnixConn)
	conn.Write([]byte("ls\n"))
	conn.CloseWrite()
	waitFor(t, "the input", func() bool { return string(vmm.Input()) == "ls\n" })
	// The half-closed client is still served...
	if n := p.clientCount(); n != 1 {
		t.Fatalf("%d clients after a half-close, want 1", n)
	}
	// ...and released as soon as it closes, though the VMM prints nothing.
	conn.Close()
	waitFor(t, "the client to be released", func() bool { return p.clientCount() == 0 })
	if s := p.Stats(); s.BytesIn != 3 || s.ClientsServed != 1 || len(s.Clients) != 0 {
		t.Errorf("Stats = %+v", s)
	}
}

func TestShutdownDrainsClients(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	conn := dial(t, p)
	out := pattern(0, 256<<10)
	feed(t, p, vmm, out)
	done := make(chan error, 1)
	go func() { done <- p.Shutdown(context.Background()) }()
	got := readUntilEOF(t, conn)
	if want := append(bytes.Clone(connectedNotice), out...); !bytes.Equal(got, want) {
		t.Errorf("drained %d bytes, want %d", len(got), len(want))
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if _, err := p.NewReader(); err != ErrClosed {
		t.Errorf("NewReader after Shutdown: %v, want ErrClosed", err)
	}
}

func TestReaderInProcess(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	feed(t, p, vmm, []byte("boot\n"))
	r, err := p.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	vmm.Write([]byte("live\n"))
	var got []byte
	buf := make([]byte, 7)
	for !bytes.HasSuffix(got, []byte("live\n")) {
		n, err := r.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
	}
	if want := string(connectedNotice) + "boot\nlive\n"; string(got) != want {
		t.Errorf("got %q, want %q", got, want)
	}
	// Close unblocks a Read parked in another goroutine.
	errc := make(chan error, 1)
	go func() { _, err := r.Read(buf); errc <- err }()
	waitFor(t, "the reader to park", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return r.parked
	})
	r.Close()
	if err := <-errc; err != ErrClosed {
		t.Errorf("Read after Close: %v, want ErrClosed", err)
	}
}

func TestCloseEndsAReaderParkedInRead(t *testing.T) {
	checkLeaks(t)
	p, err := New(Config{Upstream: &UnixUpstream{Path: filepath.Join(t.TempDir(), "vmm.sock")}})
	if err != nil {
		t.Fatal(err)
	}
	r, err := p.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := r.Read(make([]byte, 10)) // nothing to read: it parks
		done <- err
	}()
	p.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("Read after Close: %v, want ErrClosed", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("a Read parked in another goroutine did not end at Close")
	}
	if _, err := p.NewReader(); !errors.Is(err, ErrClosed) {
		t.Errorf("NewReader after Close: %v, want ErrClosed", err)
	}
}
