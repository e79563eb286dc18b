package attach

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitTimeout bounds every wait on a condition; never a substitute for one.
const waitTimeout = 20 * time.Second

func TestParseEscape(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want byte
		none bool
		bad  string // a part of the error, when it is one
	}{
		{in: "^]", want: 0x1d},
		{in: "^X", want: 0x18},
		{in: "^x", want: 0x18},
		{in: "^A", want: 0x01},
		{in: "^_", want: 0x1f},
		{in: "^?", want: 0x7f},
		{in: "~", want: '~'},
		{in: "\x0f", want: 0x0f},
		{in: "none", none: true},
		{in: "", bad: "not ^X"},
		{in: "^", want: '^'},
		{in: "^@", bad: "NUL"},
		{in: "^[", bad: "ESC"},
		{in: "\x1b", bad: "not ^X"},
		{in: "^1", bad: "after ^"},
		{in: "^XY", bad: "not ^X"},
		{in: "ab", bad: "not ^X"},
		{in: "é", bad: "not ^X"},
		{in: "None", bad: "not ^X"},
	} {
		got, none, err := ParseEscape(tc.in)
		if tc.bad != "" {
			if err == nil || !strings.Contains(err.Error(), tc.bad) {
				t.Errorf("ParseEscape(%q) = %#x, %v, %v; want an error containing %q", tc.in, got, none, err, tc.bad)
			}
			continue
		}
		if err != nil || got != tc.want || none != tc.none {
			t.Errorf("ParseEscape(%q) = %#x, %v, %v; want %#x, %v", tc.in, got, none, err, tc.want, tc.none)
		}
		if !tc.none && tc.in != "\x0f" && tc.in != "^x" && EscapeName(got) != tc.in {
			t.Errorf("EscapeName(%#x) = %q, want %q", got, EscapeName(got), tc.in)
		}
	}
}

// TestMatcherAcrossEverySplit feeds a stream in two and three pieces at
// every split point: the match is found exactly once, in the piece where it
// ends, and the bytes up to its end are what would be printed.
func TestMatcherAcrossEverySplit(t *testing.T) {
	stream := []byte("Linux version 6.1\r\nguest login: more after")
	re := regexp.MustCompile(`gu[e]st login: `)
	wantPrinted := "Linux version 6.1\r\nguest login: "
	for i := 0; i <= len(stream); i++ {
		for j := i; j <= len(stream); j++ {
			m := &matcher{re: re}
			var printed []byte
			matchedAt := -1
			for k, piece := range [][]byte{stream[:i], stream[i:j], stream[j:]} {
				end := m.feed(piece)
				if end < 0 {
					printed = append(printed, piece...)
					continue
				}
				printed = append(printed, piece[:end]...)
				matchedAt = k
				break
			}
			if matchedAt < 0 || string(printed) != wantPrinted {
				t.Fatalf("split %d,%d: matched in piece %d, printed %q; want %q", i, j, matchedAt, printed, wantPrinted)
			}
		}
	}
}

// TestMatcherWindow: a match that arrives after far more than the window
// is still found, one longer than the window across reads is not, and a
// single read larger than the window is searched whole.
func TestMatcherWindow(t *testing.T) {
	m := &matcher{re: regexp.MustCompile(`READY`)}
	filler := bytes.Repeat([]byte("x"), 4096)
	for range 100 {
		if m.feed(filler) >= 0 {
			t.Fatal("matched filler")
		}
	}
	if len(m.tail) > matchWindow {
		t.Fatalf("tail grew to %d bytes", len(m.tail))
	}
	if end := m.feed([]byte("REA")); end >= 0 {
		t.Fatal("matched half")
	}
	if end := m.feed([]byte("DY!")); end != 2 {
		t.Fatalf("feed returned %d, want 2 (the end of READY)", end)
	}

	m = &matcher{re: regexp.MustCompile(`A.*B`)}
	m.feed([]byte("A"))
	m.feed(bytes.Repeat([]byte("x"), matchWindow))
	if end := m.feed([]byte("B")); end >= 0 {
		t.Error("matched a span longer than the window")
	}

	m = &matcher{re: regexp.MustCompile(`NEEDLE`)}
	big := append(bytes.Repeat([]byte("x"), 10), "NEEDLE"...)
	big = append(big, bytes.Repeat([]byte("y"), 2*matchWindow)...)
	if end := m.feed(big); end != 16 {
		t.Errorf("feed of a large read returned %d, want 16", end)
	}
}

func TestLastNotice(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"[consoleproxy] access denied\r\n", "access denied", true},
		{"boot\r\n[consoleproxy] too many clients (max 1)\r\n", "too many clients (max 1)", true},
		{"login: \r\n[consoleproxy] console retired\r\n", "console retired", true},
		{"[consoleproxy] access denied\r\nlogin: ", "", false},
		{"echo [consoleproxy] x\r\n", "", false},
		{"", "", false},
	} {
		got, ok := lastNotice([]byte(tc.in))
		if got != tc.want || ok != tc.ok {
			t.Errorf("lastNotice(%q) = %q, %v; want %q, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// server is a client socket that plays a scripted proxy: serve is called
// with each connection, which is closed when serve returns or the test
// ends.
type server struct {
	path    string
	closing chan struct{} // closed when the test ends
	mu      sync.Mutex
	got     bytes.Buffer
	conns   int
}

func startServer(t *testing.T, serve func(s *server, c *net.UnixConn)) *server {
	t.Helper()
	s := &server{path: filepath.Join(t.TempDir(), "console.sock"), closing: make(chan struct{})}
	ln, err := net.Listen("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				serve(s, c.(*net.UnixConn))
			})
		}
	})
	t.Cleanup(func() {
		close(s.closing)
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return s
}

// record keeps everything the client sends, until it half-closes.
func (s *server) record(c net.Conn) {
	b, _ := io.ReadAll(c)
	s.mu.Lock()
	s.got.Write(b)
	s.mu.Unlock()
}

// hold records what the client sends and keeps the connection open
// until the test ends, as a proxy does.
func (s *server) hold(c net.Conn) {
	s.record(c)
	<-s.closing
}

// connected is how many clients have connected.
func (s *server) connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

func (s *server) received() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got.String()
}

// syncBuffer is Stdout for a session while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// eventually polls cond until it holds or waitTimeout passes, and says
// which; for server goroutines, which may not fail the test themselves
// (the session's result then does).
func eventually(cond func() bool) bool {
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}

// runAsync runs a session and returns its result on a channel.
func runAsync(ctx context.Context, o Options) <-chan error {
	done := make(chan error, 1)
	go func() { done <- Run(ctx, o) }()
	return done
}

func result(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(waitTimeout):
		t.Fatal("the session did not end")
		return nil
	}
}

// TestUntilSplitAcrossReads: the server writes half of the pattern, waits
// until the client has printed it (so the halves are two reads), then the
// rest; the session ends at the match and prints nothing after it.
func TestUntilSplitAcrossReads(t *testing.T) {
	var out syncBuffer
	srv := startServer(t, func(_ *server, c *net.UnixConn) {
		c.Write([]byte("boot log\r\nguest lo"))
		eventually(func() bool { return strings.HasSuffix(out.String(), "guest lo") })
		c.Write([]byte("gin: and more"))
		io.Copy(io.Discard, c)
	})
	err := result(t, runAsync(context.Background(), Options{Socket: srv.path, ReadOnly: true, Until: regexp.MustCompile(`login: `), Stdout: &out}))
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := out.String(); got != "boot log\r\nguest login: " {
		t.Errorf("printed %q", got)
	}
}

func TestTimeout(t *testing.T) {
	srv := startServer(t, func(s *server, c *net.UnixConn) {
		c.Write([]byte("no prompt here\r\n"))
		s.hold(c)
	})
	start := time.Now()
	err := result(t, runAsync(context.Background(), Options{Socket: srv.path, ReadOnly: true, Until: regexp.MustCompile(`login:`), Timeout: 200 * time.Millisecond}))
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), `no match for "login:" within 200ms`) {
		t.Fatalf("Run = %v, want ErrTimeout naming the pattern", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Errorf("timed out after %v, before the 200ms timeout", d)
	}

	err = result(t, runAsync(context.Background(), Options{Socket: srv.path, ReadOnly: true, Timeout: 100 * time.Millisecond}))
	if !errors.Is(err, ErrTimeout) || err.Error() != "timed out after 100ms" {
		t.Fatalf("Run without Until = %v, want ErrTimeout", err)
	}
}

// TestEndOfInputHalfClosesAndLingers: the server answers only once the
// client half-closed, and again a little later; both answers are printed,
// and the session ends by itself after the linger.
func TestEndOfInputHalfClosesAndLingers(t *testing.T) {
	var out syncBuffer
	srv := startServer(t, func(s *server, c *net.UnixConn) {
		b, _ := io.ReadAll(c) // until the half-close
		c.Write(append([]byte("got "), b...))
		eventually(func() bool { return strings.Contains(out.String(), "got ") })
		c.Write([]byte(" and later"))
		<-s.closing
	})
	stdin, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	w.Write([]byte("uname -a\n"))
	w.Close()
	start := time.Now()
	err = result(t, runAsync(context.Background(), Options{Socket: srv.path, Linger: 300 * time.Millisecond, Stdin: stdin, Stdout: &out}))
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := out.String(); got != "got uname -a\n and later" {
		t.Errorf("printed %q", got)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("ended after %v, before the linger", d)
	}
}

// TestReadOnlySendsNothing: with input waiting on stdin, a read-only
// session sends nothing, and half-closes at once.
func TestReadOnlySendsNothing(t *testing.T) {
	srv := startServer(t, func(s *server, c *net.UnixConn) {
		s.record(c) // until the half-close
		c.Write([]byte("you sent " + strconv.Itoa(len(s.received())) + " bytes\r\n"))
	})
	stdin, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	defer w.Close()
	w.Write([]byte("rm -rf /\n"))
	var out syncBuffer
	err = result(t, runAsync(context.Background(), Options{Socket: srv.path, ReadOnly: true, Stdin: stdin, Stdout: &out}))
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("Run = %v, want ErrClosed", err)
	}
	if got := out.String(); got != "you sent 0 bytes\r\n" {
		t.Errorf("printed %q", got)
	}
}

func TestRefusalNoticeIsTheReason(t *testing.T) {
	srv := startServer(t, func(_ *server, c *net.UnixConn) {
		c.Write([]byte("[consoleproxy] too many clients (max 1)\r\n"))
	})
	err := result(t, runAsync(context.Background(), Options{Socket: srv.path, Stdin: strings.NewReader("")}))
	if !errors.Is(err, ErrClosed) || err.Error() != "connection closed: too many clients (max 1)" {
		t.Fatalf("Run = %v", err)
	}
}

// TestClosedWhileTyping: a stdin that never ends (an open pipe) and a
// proxy that closes: the session ends with ErrClosed and stops reading
// stdin, with no goroutine left (TestMain checks).
func TestClosedWhileTyping(t *testing.T) {
	srv := startServer(t, func(_ *server, c *net.UnixConn) {
		c.Write([]byte("bye\r\n"))
	})
	stdin, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	defer w.Close()
	err = result(t, runAsync(context.Background(), Options{Socket: srv.path, Stdin: stdin}))
	if !errors.Is(err, ErrClosed) || err.Error() != "connection closed" {
		t.Fatalf("Run = %v, want plain ErrClosed", err)
	}
}

func TestCancelEndsTheSession(t *testing.T) {
	srv := startServer(t, func(s *server, c *net.UnixConn) { s.hold(c) })
	stdin, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	defer w.Close()
	ctx, cancel := context.WithCancelCause(context.Background())
	done := runAsync(ctx, Options{Socket: srv.path, Stdin: stdin})
	if !eventually(func() bool { return srv.connected() == 1 }) {
		t.Fatal("the session did not connect")
	}
	cause := errors.New("received terminated")
	cancel(cause)
	if err := result(t, done); err != cause {
		t.Fatalf("Run = %v, want the context's cause", err)
	}
}

// statusServer serves a status document per the contract.
func statusServer(t *testing.T, doc any) string {
	t.Helper()
	b, err := json.Marshal(doc)
	b = append(b, '\n')
	if err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, func(_ *server, c *net.UnixConn) { c.Write(b) })
	return srv.path
}

func TestLookupConsole(t *testing.T) {
	type console struct {
		Name       string `json:"name"`
		Upstream   string `json:"upstream"`
		UpstreamUp bool   `json:"upstream_up"`
		Listen     string `json:"listen"`
		ListenRO   string `json:"listen_ro"`
		Clients    []any  `json:"clients"`
	}
	status := statusServer(t, map[string]any{
		"version":        "v1.2.3",
		"uptime_seconds": 12.5,
		"consoles": []console{
			{Name: "vm1", Upstream: "unix:/run/vms/vm1/serial.sock", UpstreamUp: true, Listen: "/run/vms/vm1/console.sock", ListenRO: "/run/vms/vm1/ro.sock", Clients: []any{}},
			{Name: "vm2", Upstream: "unix:/run/vms/vm2/serial.sock", Listen: "/run/vms/vm2/console.sock", Clients: []any{}},
		},
	})
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		readOnly bool
		want     string
		err      error
		msg      string
	}{
		{name: "vm1", want: "/run/vms/vm1/console.sock"},
		{name: "vm1", readOnly: true, want: "/run/vms/vm1/ro.sock"},
		{name: "vm2", want: "/run/vms/vm2/console.sock"},
		{name: "vm2", readOnly: true, err: ErrNoReadOnlySocket, msg: `no read-only socket: console "vm2"`},
		{name: "vm3", err: ErrUnknownConsole, msg: `no console "vm3" in ` + status + `; there are "vm1", "vm2"`},
	} {
		got, err := LookupConsole(ctx, status, tc.name, tc.readOnly)
		if got != tc.want || !errors.Is(err, tc.err) || (tc.msg != "" && !strings.Contains(err.Error(), tc.msg)) {
			t.Errorf("LookupConsole(%q, read-only %v) = %q, %v; want %q, %v %q", tc.name, tc.readOnly, got, err, tc.want, tc.err, tc.msg)
		}
	}

	empty := statusServer(t, map[string]any{"version": "v1", "uptime_seconds": 1, "consoles": []any{}})
	if _, err := LookupConsole(ctx, empty, "vm1", false); !errors.Is(err, ErrUnknownConsole) || !strings.Contains(err.Error(), "there are none") {
		t.Errorf("no consoles: %v", err)
	}
	garbage := startServer(t, func(_ *server, c *net.UnixConn) { c.Write([]byte("hello\n")) })
	if _, err := LookupConsole(ctx, garbage.path, "vm1", false); err == nil || !strings.Contains(err.Error(), "not a status document") {
		t.Errorf("garbage: %v", err)
	}
}

// TestRunByName attaches through a status document to a console socket.
func TestRunByName(t *testing.T) {
	srv := startServer(t, func(s *server, c *net.UnixConn) { c.Write([]byte("vm1 login: ")); s.hold(c) })
	status := statusServer(t, map[string]any{"version": "v1", "uptime_seconds": 1,
		"consoles": []map[string]any{{"name": "vm1", "listen": srv.path, "listen_ro": ""}}})
	var out syncBuffer
	err := result(t, runAsync(context.Background(), Options{Status: status, Console: "vm1", ReadOnly: false,
		Until: regexp.MustCompile(`login: `), Stdin: strings.NewReader(""), Stdout: &out}))
	if err != nil || out.String() != "vm1 login: " {
		t.Fatalf("Run = %v, printed %q", err, out.String())
	}
	if got := srv.received(); got != "" {
		t.Errorf("sent %q", got)
	}
}
