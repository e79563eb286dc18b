package chaos

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/e2e"
)

// binary is consoleproxy, built without the race detector so that memory
// figures are the daemon's own (e2e runs the race build).
var binary string

// full selects the full counts.
var full = os.Getenv("CONSOLEPROXY_CHAOS") == "full"

func TestMain(m *testing.M) { e2e.Main(m, false, &binary) }

// scale picks the short or the full count.
func scale(short, long int) int {
	if full {
		return long
	}
	return short
}

// figure logs a result for the README's Reliability section.
func figure(t *testing.T, format string, args ...any) {
	t.Helper()
	t.Logf("figure: %s: %s", t.Name(), fmt.Sprintf(format, args...))
}

// The pattern stream: lines of lineLen bytes holding their own offset.
const lineLen = 16

func pattern(off, n uint64) []byte {
	b := make([]byte, n)
	for i := uint64(0); i < n; i += lineLen {
		v := off + i
		for d := lineLen - 2; d >= 0; d-- {
			b[i+uint64(d)] = byte('0' + v%10)
			v /= 10
		}
		b[i+lineLen-1] = '\n'
	}
	return b
}

// vmm is a console socket with Cloud Hypervisor's semantics: one client,
// the newest wins, output with nobody connected is dropped, and the socket
// file goes away with the VMM.
type vmm struct {
	path string
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	conn net.Conn
}

func startVMM(t testing.TB, path string) *vmm {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	v := &vmm{path: path, ln: ln}
	v.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			v.mu.Lock()
			if v.conn != nil {
				v.conn.Close()
			}
			v.conn = c
			v.mu.Unlock()
			v.wg.Go(func() { discardInput(c) })
		}
	})
	t.Cleanup(v.kill)
	return v
}

func discardInput(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

// waitConn returns the proxy's connection once it has attached.
func (v *vmm) waitConn(t testing.TB) net.Conn {
	t.Helper()
	var c net.Conn
	e2e.WaitFor(t, "the proxy to attach", func() bool {
		v.mu.Lock()
		defer v.mu.Unlock()
		c = v.conn
		return c != nil
	})
	return c
}

// kill ends the VMM: its socket file goes, and its connection closes.
func (v *vmm) kill() {
	v.ln.Close()
	v.mu.Lock()
	if v.conn != nil {
		v.conn.Close()
		v.conn = nil
	}
	v.mu.Unlock()
	v.wg.Wait()
}

// daemon is the proxy process.
type daemon struct {
	*e2e.Proc
	sock string
}

func startDaemon(t testing.TB, dir string, extra ...string) *daemon {
	t.Helper()
	sock := filepath.Join(dir, "console.sock")
	args := append([]string{"--upstream", "unix:" + filepath.Join(dir, "vmm.sock"), "--listen", sock}, extra...)
	d := &daemon{Proc: e2e.Start(t, nil, binary, args...), sock: sock}
	// A connection, not the file: a stale socket may be there already.
	e2e.WaitFor(t, "the daemon to serve", func() bool { return strings.Contains(d.Stderr.String(), "started:") })
	return d
}

var statsRE = regexp.MustCompile(`process: .*goroutines=(\d+)`)

// stats asks the daemon for its SIGUSR1 report and returns its goroutines
// and open descriptors.
func (d *daemon) stats(t testing.TB) (goroutines, fds int) {
	t.Helper()
	before := len(statsRE.FindAllString(d.Stderr.String(), -1))
	d.Cmd.Process.Signal(syscall.SIGUSR1)
	var m [][]string
	e2e.WaitFor(t, "the SIGUSR1 report", func() bool {
		m = statsRE.FindAllStringSubmatch(d.Stderr.String(), -1)
		return len(m) > before
	})
	goroutines, _ = strconv.Atoi(m[len(m)-1][1])
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.Cmd.Process.Pid))
	return goroutines, len(entries)
}

// rssKiB returns the daemon's resident memory.
func (d *daemon) rssKiB(t testing.TB) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", d.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

// checker verifies a stream of pattern lines and notices as it arrives:
// every pattern line must follow the previous one, except after a drop or
// loss notice whose count is exactly the bytes skipped.
type checker struct {
	next      uint64 // the offset the next pattern line must hold
	first     uint64 // the offset the first pattern line held
	started   bool
	pending   uint64 // bytes a notice announced that the next line must skip
	partial   []byte
	notices   []string
	announced uint64 // bytes covered by notices
	err       error
}

var countRE = regexp.MustCompile(`^(?:console log: )?(\d+) bytes (?:dropped|not logged)`)

func (c *checker) write(b []byte) {
	c.partial = append(c.partial, b...)
	for c.err == nil {
		i := bytes.IndexByte(c.partial, '\n')
		if i < 0 {
			return
		}
		line := c.partial[:i+1]
		c.partial = c.partial[i+1:]
		if n, ok := bytes.CutPrefix(line, []byte("[consoleproxy] ")); ok {
			text := strings.TrimRight(string(n), "\r\n")
			c.notices = append(c.notices, text)
			if m := countRE.FindStringSubmatch(text); m != nil {
				v, _ := strconv.ParseUint(m[1], 10, 64)
				c.pending += v
			}
			continue
		}
		if len(line) == 2 && line[0] == '\r' { // the CRLF before a notice
			continue
		}
		if len(line) < lineLen+1 && bytes.HasSuffix(line, []byte("\r\n")) {
			// A line cut short by a notice (which starts a line of its
			// own): its bytes are the start of the line due at c.next,
			// and the notice's count runs from where they end.
			part := line[:len(line)-2]
			if !c.started || !bytes.HasPrefix(pattern(c.next, lineLen), part) {
				c.err = fmt.Errorf("at %d: %q is not the start of the line due", c.next, part)
				return
			}
			c.next += uint64(len(part))
			continue
		}
		off, err := strconv.ParseUint(string(bytes.TrimRight(line, "\r\n")), 10, 64)
		if err != nil || len(line) != lineLen {
			c.err = fmt.Errorf("not a pattern line: %q", line)
			return
		}
		switch {
		case !c.started:
			c.started = true
			c.first = off
		case off != c.next+c.pending:
			c.err = fmt.Errorf("at %d: line holds %d, notices announced %d skipped bytes", c.next, off, c.pending)
			return
		}
		c.announced += c.pending
		c.pending = 0
		c.next = off + lineLen
	}
}

// client reads the proxy in a goroutine, checking what arrives.
type client struct {
	conn net.Conn
	mu   sync.Mutex
	c    checker
	eof  error // why reading stopped
	done chan struct{}
}

func attach(t testing.TB, sock string, pace time.Duration) *client {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	cl := &client{conn: conn, done: make(chan struct{})}
	go func() {
		defer close(cl.done)
		buf := make([]byte, 64<<10)
		if pace > 0 {
			buf = buf[:4<<10]
		}
		for {
			n, err := conn.Read(buf)
			cl.mu.Lock()
			cl.c.write(buf[:n])
			cl.mu.Unlock()
			if err != nil {
				cl.mu.Lock()
				cl.eof = err
				cl.mu.Unlock()
				return
			}
			if pace > 0 {
				time.Sleep(pace) // a slow reader, on purpose
			}
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		<-cl.done
	})
	return cl
}

// reached waits until the client has received the stream up to off,
// failing at once if what it received is wrong.
func (cl *client) reached(t testing.TB, what string, off uint64) {
	t.Helper()
	e2e.WaitFor(t, what, func() bool {
		next, _, _, err, eof := cl.state()
		if err != nil || (eof != nil && next < off) {
			t.Fatalf("%s: %v (reading stopped: %v)", what, err, eof)
		}
		return next >= off
	})
}

func (cl *client) state() (next uint64, notices []string, announced uint64, err, eof error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.c.next, append([]string(nil), cl.c.notices...), cl.c.announced, cl.c.err, cl.eof
}
