package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/unixsock"
	"go.uber.org/goleak"
)

// waitTimeout bounds every wait in these tests: generous, because the
// machines are shared, and never a substitute for a condition.
const waitTimeout = 20 * time.Second

// checkLeaks fails the test if goroutines started during it outlive it. Call
// it first, so that its cleanup runs after every other cleanup.
func checkLeaks(t *testing.T) {
	t.Helper()
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
}

// waitFor polls cond until it holds or waitTimeout passes.
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

// fakeVMM is a console socket with Cloud Hypervisor's semantics: one client
// at a time, the newest connection wins, and output written while nobody is
// connected is dropped.
type fakeVMM struct {
	t    *testing.T
	path string
	ln   net.Listener
	wg   sync.WaitGroup

	mu       sync.Mutex
	conn     net.Conn
	accepted int
	input    bytes.Buffer
}

func startVMM(t *testing.T, path string) *fakeVMM {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("fake VMM: %v", err)
	}
	v := &fakeVMM{t: t, path: path, ln: ln}
	v.wg.Go(v.accept)
	t.Cleanup(v.Kill)
	return v
}

func (v *fakeVMM) accept() {
	for {
		conn, err := v.ln.Accept()
		if err != nil {
			return
		}
		v.mu.Lock()
		if v.conn != nil {
			v.conn.Close() // newest wins
		}
		v.conn = conn
		v.accepted++
		v.mu.Unlock()
		v.wg.Go(func() {
			buf := make([]byte, 64)
			for {
				n, err := conn.Read(buf)
				v.mu.Lock()
				v.input.Write(buf[:n])
				v.mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
}

// Kill closes the socket and every connection and removes the socket file,
// as a VMM that exits does.
func (v *fakeVMM) Kill() {
	v.ln.Close()
	v.mu.Lock()
	if v.conn != nil {
		v.conn.Close()
		v.conn = nil
	}
	v.mu.Unlock()
	v.wg.Wait()
}

// Write sends b to the connected client, or drops it when there is none. It
// reports whether b was sent.
func (v *fakeVMM) Write(b []byte) bool {
	v.mu.Lock()
	conn := v.conn
	v.mu.Unlock()
	if conn == nil {
		return false
	}
	_, err := conn.Write(b)
	return err == nil
}

func (v *fakeVMM) Accepted() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.accepted
}

func (v *fakeVMM) Input() []byte {
	v.mu.Lock()
	defer v.mu.Unlock()
	return bytes.Clone(v.input.Bytes())
}

// testProxy is a Proxy with its upstream loop and client socket running.
type testProxy struct {
	*Proxy
	sock string
}

// startProxy runs a proxy for cfg with a client socket in a fresh directory;
// when cfg has no upstream, it is a unix: upstream at dir/vmm.sock. It
// returns the proxy and that directory.
func startProxy(t *testing.T, cfg Config) (*testProxy, string) {
	t.Helper()
	return startProxyIn(t, t.TempDir(), cfg)
}

// startProxyIn is startProxy in dir.
func startProxyIn(t *testing.T, dir string, cfg Config) (*testProxy, string) {
	t.Helper()
	if cfg.Upstream == nil {
		cfg.Upstream = &UnixUpstream{Path: filepath.Join(dir, "vmm.sock")}
	}
	sock := filepath.Join(dir, "console.sock")
	ln, err := unixsock.Listen(sock, unixsock.SocketOptions{})
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	cfg.OwnSockets = append(cfg.OwnSockets, ln)
	p, err := New(cfg)
	if err != nil {
		ln.Close()
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { p.RunUpstream(ctx) })
	wg.Go(func() {
		if err := p.Serve(ln); !errors.Is(err, ErrClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	t.Cleanup(func() {
		cancel()
		p.Close()
		wg.Wait()
	})
	return &testProxy{Proxy: p, sock: sock}, dir
}

// ringEnd returns how many bytes the ring has taken in.
func (p *testProxy) ringEnd() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ring.End()
}

func (p *testProxy) clientCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.clients)
}

// dial connects a client to sock and waits until the proxy has admitted it,
// so that what the test does next happens after the client's replay point.
func dial(t *testing.T, p *testProxy) net.Conn {
	t.Helper()
	admitted := func() uint64 {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.nextID
	}
	before := admitted()
	conn, err := net.Dial("unix", p.sock)
	if err != nil {
		t.Fatalf("dial %s: %v", p.sock, err)
	}
	t.Cleanup(func() { conn.Close() })
	waitFor(t, "the client to be admitted", func() bool { return admitted() > before })
	return conn
}

// readUntil reads from conn, appending to got, until done(got) holds.
func readUntil(t *testing.T, conn net.Conn, got []byte, what string, done func([]byte) bool) []byte {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(waitTimeout))
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 64<<10)
	for !done(got) {
		n, err := conn.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil && !done(got) {
			t.Fatalf("waiting for %s: %v after %d bytes; tail %q", what, err, len(got), tail(got))
		}
	}
	return got
}

// readN reads until got holds n bytes.
func readN(t *testing.T, conn net.Conn, got []byte, n int) []byte {
	t.Helper()
	return readUntil(t, conn, got, fmt.Sprintf("%d bytes", n), func(b []byte) bool { return len(b) >= n })
}

func tail(b []byte) []byte {
	if len(b) > 200 {
		return b[len(b)-200:]
	}
	return b
}

// The pattern stream: lines of patternLine bytes, each holding the offset of
// its own first byte, so that any gap or duplicate in what a client
// receives is detectable from the bytes alone.
const patternLine = 16

// pattern returns the stream's bytes [off, off+n). off and n are multiples
// of patternLine.
func pattern(off, n uint64) []byte {
	b := make([]byte, n)
	for i := uint64(0); i < n; i += patternLine {
		v := off + i
		for d := patternLine - 2; d >= 0; d-- {
			b[i+uint64(d)] = byte('0' + v%10)
			v /= 10
		}
		b[i+patternLine-1] = '\n'
	}
	return b
}

// lineOffset parses the offset a pattern line holds.
func lineOffset(line []byte) (uint64, bool) {
	if len(line) < patternLine || line[patternLine-1] != '\n' {
		return 0, false
	}
	var v uint64
	for _, c := range line[:patternLine-1] {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return v, true
}

var noticeLine = []byte(noticePrefix)

// splitNotices separates notice lines from stream bytes. A notice is
// "[consoleproxy] TEXT\r\n", possibly preceded by "\r\n".
func splitNotices(b []byte) (data []byte, notices []string) {
	for {
		i := bytes.Index(b, noticeLine)
		if i < 0 {
			return append(data, b...), notices
		}
		end := bytes.Index(b[i:], []byte("\r\n"))
		if end < 0 {
			return append(data, b...), notices
		}
		pre := b[:i]
		pre = bytes.TrimSuffix(pre, []byte("\r\n"))
		data = append(data, pre...)
		notices = append(notices, string(b[i+len(noticeLine):i+end]))
		b = b[i+end+2:]
	}
}

// checkContiguous asserts that data is whole pattern lines with no gap or
// duplicate, and returns the offsets of its first byte and one past its last.
func checkContiguous(t *testing.T, data []byte) (first, end uint64) {
	t.Helper()
	if len(data)%patternLine != 0 {
		t.Fatalf("received %d bytes, not whole lines; tail %q", len(data), tail(data))
	}
	for i := 0; i < len(data); i += patternLine {
		off, ok := lineOffset(data[i:])
		if !ok {
			t.Fatalf("line at %d is not a pattern line: %q", i, data[i:i+patternLine])
		}
		if i == 0 {
			first = off
		} else if want := first + uint64(i); off != want {
			t.Fatalf("gap or duplicate: line %d holds offset %d, want %d", i/patternLine, off, want)
		}
	}
	return first, first + uint64(len(data))
}

func countPrefix(notices []string, prefix string) int {
	c := 0
	for _, n := range notices {
		if strings.HasPrefix(n, prefix) {
			c++
		}
	}
	return c
}

func timeNowPlusWait() time.Time { return time.Now().Add(waitTimeout) }

// readUntilEOF reads everything until the proxy closes the connection.
func readUntilEOF(t *testing.T, conn net.Conn) []byte {
	t.Helper()
	conn.SetReadDeadline(timeNowPlusWait())
	b, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading until EOF: %v after %d bytes", err, len(b))
	}
	return b
}
