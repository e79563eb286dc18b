// Package upstream connects to a VM's console where the VMM serves it (a
// Unix socket, a PTY, TCP) or waits for the VMM to connect (listen:), and
// keeps it connected: Run reconnects across VM restarts, waits for a
// missing socket through the process's shared inotify watcher, and backs
// off from a VMM that keeps dropping it.
//
// What it reads goes to a Sink (package proxy's fan-out is one) and what
// the sink writes to the connection goes to the VMM. Run never waits for
// the sink: reading the upstream is what keeps the VM from stalling.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/warnlimit"
	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Upstream is where console output comes from: a VMM's console endpoint.
type Upstream interface {
	// Dial makes one attempt to open a connection. It may block until one
	// arrives (a listening upstream waits for the VMM to dial in); it must
	// return when ctx is done. RunUpstream calls it again, with backoff,
	// after it fails or the connection ends.
	Dial(ctx context.Context) (io.ReadWriteCloser, error)
	// String names the upstream for logs, as a spec ParseUpstream accepts.
	String() string
}

// ErrBadSpec is wrapped by ParseUpstream's errors.
var ErrBadSpec = errors.New("bad upstream spec")

// ParseUpstream turns an --upstream spec into an Upstream:
//
//	unix:PATH       connect to a socket the VMM listens on
//	pty:PATH        open a PTY (or a symlink to one) in raw mode
//	listen:PATH     listen on PATH for the VMM to connect (see ListenUpstream)
//	tcp:HOST:PORT   connect over TCP
//
// A bare PATH with no kind is accepted when it exists: a socket means unix:,
// a character device pty:. ParseUpstream binds nothing; only a bare PATH is
// looked at on the system.
func ParseUpstream(spec string) (Upstream, error) {
	kind, rest, found := strings.Cut(spec, ":")
	if !found || strings.Contains(kind, "/") {
		return parseBarePath(spec)
	}
	switch kind {
	case "unix", "listen":
		if err := unixsock.CheckSocketPath(rest); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadSpec, err)
		}
		if kind == "listen" {
			return &ListenUpstream{Path: rest}, nil
		}
		return &UnixUpstream{Path: rest}, nil
	case "pty":
		if rest == "" {
			return nil, fmt.Errorf("%w: %q: empty path", ErrBadSpec, spec)
		}
		return &PTYUpstream{Path: rest}, nil
	case "tcp":
		host, port, err := net.SplitHostPort(rest)
		if err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("%w: %q: want tcp:HOST:PORT", ErrBadSpec, spec)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("%w: %q: port %q is not 1 to 65535", ErrBadSpec, spec, port)
		}
		return &TCPUpstream{Address: rest}, nil
	}
	return nil, fmt.Errorf("%w: %q: unknown kind %q (want unix:, pty:, listen: or tcp:)", ErrBadSpec, spec, kind)
}

func parseBarePath(path string) (Upstream, error) {
	if path == "" {
		return nil, fmt.Errorf("%w: empty", ErrBadSpec)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %q has no kind prefix (unix:, pty:, listen:, tcp:) and cannot be inspected: %w", ErrBadSpec, path, err)
	}
	switch fi.Mode().Type() {
	case os.ModeSocket:
		return ParseUpstream("unix:" + path)
	case os.ModeDevice | os.ModeCharDevice:
		return ParseUpstream("pty:" + path)
	}
	return nil, fmt.Errorf("%w: %q has no kind prefix and is neither a socket nor a character device", ErrBadSpec, path)
}

// UnixUpstream connects to a socket the VMM listens on (Cloud Hypervisor's
// --serial socket=PATH, QEMU's -chardev socket,server=on). While the socket
// is missing, RunUpstream watches its directory, so it attaches within
// milliseconds of the VMM creating it.
type UnixUpstream struct {
	Path string
}

// Dial connects to Path once.
func (u *UnixUpstream) Dial(ctx context.Context) (io.ReadWriteCloser, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", u.Path)
}

func (u *UnixUpstream) String() string { return "unix:" + u.Path }

func (u *UnixUpstream) watchPath() string { return u.Path }

// TCPUpstream connects to a VMM's console over TCP (QEMU -chardev
// socket,host=…,port=…,server=on; Cloud Hypervisor's TCP serial).
type TCPUpstream struct {
	Address string // host:port
}

// Dial connects to Address once.
func (u *TCPUpstream) Dial(ctx context.Context) (io.ReadWriteCloser, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", u.Address)
}

func (u *TCPUpstream) String() string { return "tcp:" + u.Address }

// ListenUpstream listens on a socket that the VMM connects to (QEMU
// -chardev socket,server=off; Cloud Hypervisor's connect role). It serves
// one VMM connection at a time: a second VMM waits in the backlog until the
// first closes, as QEMU's own server sockets do. Call Listen before
// RunUpstream, so a path in the way fails the start; Close removes the
// socket.
//
// Whoever connects is the VMM: it sees what clients type (passwords
// included) and writes what they read. So Access, when set, is checked as
// for client sockets, and the proxy's own uid is allowed besides root.
type ListenUpstream struct {
	Path   string
	Socket unixsock.SocketOptions
	Access *unixsock.Access

	ln *unixsock.SocketListener
}

// DeniedError is returned by ListenUpstream.Dial for a peer that Access
// refused; the connection was closed. RunUpstream logs it and accepts the
// next one at once.
type DeniedError struct {
	Cred unix.Ucred
}

func (e *DeniedError) Error() string {
	return fmt.Sprintf("VMM connection refused: access denied (pid %d, uid %d, gid %d)", e.Cred.Pid, e.Cred.Uid, e.Cred.Gid)
}

// Listen creates the socket, with the same rules as client sockets.
func (u *ListenUpstream) Listen() error {
	ln, err := unixsock.Listen(u.Path, u.Socket)
	if err != nil {
		return err
	}
	u.ln = ln
	return nil
}

// Dial waits for the next VMM connection.
func (u *ListenUpstream) Dial(ctx context.Context) (io.ReadWriteCloser, error) {
	if u.ln == nil {
		return nil, errors.New("listen upstream: Listen was not called")
	}
	stop := context.AfterFunc(ctx, func() { u.ln.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	conn, err := u.ln.Accept()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	if cred := unixsock.PeerCred(conn); !u.allows(cred) {
		conn.Close()
		return nil, &DeniedError{Cred: cred}
	}
	return conn, nil
}

func (u *ListenUpstream) allows(cred unix.Ucred) bool {
	return u.Access == nil || cred.Uid == uint32(os.Getuid()) || u.Access.Allows(cred)
}

// Close stops listening and removes the socket if it is still ours.
func (u *ListenUpstream) Close() error {
	if u.ln == nil {
		return nil
	}
	return u.ln.Close()
}

func (u *ListenUpstream) String() string { return "listen:" + u.Path }

// Reconnect timing. A VMM that restarts is reattached after minBackoff, or
// at once where its socket's directory can be watched; one that keeps
// refusing is retried at most every maxBackoff. The backoff resets only
// after a connection has stayed up for stableAfter, so a VMM that accepts
// and at once drops the proxy cannot make it spin.
const (
	minBackoff  = 10 * time.Millisecond
	maxBackoff  = time.Second
	stableAfter = 5 * time.Second

	// fastRetry follows a change to the watched path: a VMM creates its
	// socket with bind() a moment before listen(), and a connect() in
	// between is refused.
	fastRetry = 100 * time.Microsecond

	// takeoverWindow: Cloud Hypervisor lets the newest connection win, so
	// a connection dropped this soon while the socket still exists was
	// most likely taken over by another client.
	takeoverWindow = time.Second
)

// TakeoverBackoff is the least Run waits after a takeover (see
// takeoverWindow) before it reconnects, so that it does not fight
// whoever took the console over.
const TakeoverBackoff = 250 * time.Millisecond

// pathWatcher is an Upstream at a filesystem path that can be watched while
// it is missing.
type pathWatcher interface {
	watchPath() string
}

// upstreamReadSize is the read size on the upstream: large enough that a
// flood costs few wake-ups, small enough to stay cache-resident.
const upstreamReadSize = 64 << 10

// Sink receives one upstream's connections and output. Its methods are
// called from Run's goroutine, one at a time, and must not block: Output is
// on the path that keeps the VM drained.
type Sink interface {
	// Connected is called when a connection is up: input for the VMM may be
	// written to w until Disconnected returns.
	Connected(w io.Writer)
	// Output is called with every read; b is reused once it returns.
	Output(b []byte)
	// Disconnected is called when the connection has ended and been
	// closed, with why (as the lost notice words it); stopping is set when
	// it ended because Run's context was done.
	Disconnected(reason string, stopping bool)
}

// Options configures Run. Zero fields mean the defaults.
type Options struct {
	// ExitWithUpstream makes Run return nil once the first connection
	// ends, instead of reconnecting.
	ExitWithUpstream bool
	// Watcher is the process's shared inotify watcher. Nil means a
	// private one.
	Watcher *watch.Watcher
	// IsOwn, when set, reports whether a path names one of the proxy's
	// own sockets: Run never connects to one, or the proxy would read its
	// own output forever.
	IsOwn func(path string) bool
	// Logger receives the upstream's diagnostics. Nil means none.
	Logger hclog.Logger
}

// ErrOwnSocket is why Run does not connect to an upstream path that names
// one of the proxy's own sockets.
var ErrOwnSocket = errors.New("it is one of this proxy's own sockets; not connecting to it")

// Run keeps up connected and drains it into sink until ctx is done, then
// returns nil. It reconnects with backoff after failures and lost
// connections; with ExitWithUpstream it returns nil once the first
// connection ends. When up can be closed (ListenUpstream), it is closed on
// return. Call it once per upstream.
func Run(ctx context.Context, up Upstream, sink Sink, opts Options) error {
	if c, ok := up.(io.Closer); ok {
		defer c.Close()
	}
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	takeoverWarn := warnlimit.New(log, "upstream closed the connection right after accepting it while its socket still exists; "+
		"another client probably connected to the VMM directly and took the console over; backing off")
	defer takeoverWarn.Stop()
	deniedWarn := warnlimit.New(log, "VMM connection refused: access denied")
	defer deniedWarn.Stop()
	buf := make([]byte, upstreamReadSize)
	var pw *pathWatch // nil for upstreams that are not at a path
	if w, ok := up.(pathWatcher); ok {
		watcher := opts.Watcher
		if watcher == nil {
			watcher = watch.New()
			defer watcher.Close()
		}
		pw = newPathWatch(w.watchPath(), watcher, log)
		defer pw.unhold()
	}
	delay := minBackoff
	failures := 0
	for {
		before := pathOf(up)
		var conn io.ReadWriteCloser
		var err error
		if w, ok := up.(pathWatcher); ok && opts.IsOwn != nil && opts.IsOwn(w.watchPath()) {
			err = fmt.Errorf("%s: %w", w.watchPath(), ErrOwnSocket)
		} else {
			conn, err = up.Dial(ctx)
		}
		if ctx.Err() != nil {
			if err == nil {
				conn.Close()
			}
			return nil
		}
		if denied := (*DeniedError)(nil); errors.As(err, &denied) {
			// Not the VMM: the real one may be next in the backlog, so
			// accept again at once.
			deniedWarn.Warn("pid", denied.Cred.Pid, "uid", denied.Cred.Uid, "gid", denied.Cred.Gid)
			continue
		}
		if err != nil {
			// The first failure of a run is worth an operator's attention
			// (the VM is not there); repeating it every second is not.
			if failures == 0 {
				log.Info("waiting for upstream", "error", err)
			} else {
				log.Debug("upstream not reachable", "error", err, "attempts", failures+1)
			}
			failures++
		} else {
			// What the path names now is what we connected to; taken
			// before the dial, it could predate a socket that appeared
			// meanwhile, and after a takeover that socket would look new.
			before = pathOf(up)
			failures = 0
			if pw != nil {
				pw.unhold()
			}
			connected := time.Now()
			reason := drain(ctx, conn, buf, sink, log)
			if ctx.Err() != nil {
				return nil
			}
			uptime := time.Since(connected)
			log.Info("upstream lost", "reason", reason, "uptime", uptime.Round(time.Millisecond))
			if opts.ExitWithUpstream {
				return nil
			}
			if uptime >= stableAfter {
				delay = minBackoff
			}
			// A takeover cuts the connection and leaves the socket as it
			// was; a VMM that crashed and came back has a new socket, and
			// one that is gone has none: neither is a takeover.
			if _, ok := up.(pathWatcher); ok && uptime < takeoverWindow && reason == "EOF" && pathOf(up) == before {
				takeoverWarn.Warn("uptime", uptime.Round(time.Millisecond))
				delay = max(delay, TakeoverBackoff)
			}
		}
		// Wait before the next attempt. A path that changes (a VMM that
		// comes back creates its socket anew) ends the wait at once; a
		// takeover leaves the socket alone and waits the full delay.
		changed := waitRetry(ctx, pw, delay, before)
		if ctx.Err() != nil {
			return nil
		}
		log.Trace("retrying upstream", "path_changed", changed, "waited_at_most", delay)
		if changed {
			delay = fastRetry
		} else {
			delay = min(2*delay, maxBackoff)
		}
	}
}

// pathOf returns what the upstream's path names now, for waitRetry to
// tell whether it changed since.
func pathOf(up Upstream) pathID {
	if w, ok := up.(pathWatcher); ok {
		return statPath(w.watchPath())
	}
	return pathID{}
}

// waitRetry waits up to delay before the next attempt, less when the
// watched path (if any) changes from before, and reports whether it did.
func waitRetry(ctx context.Context, watch *pathWatch, delay time.Duration, before pathID) bool {
	if delay < time.Millisecond {
		// The runtime rounds a timer up to a millisecond when it has
		// nothing else to do, which would make each fast retry ten times
		// as long as asked. A wait this short is spent in the kernel.
		unix.Nanosleep(&unix.Timespec{Nsec: delay.Nanoseconds()}, nil)
		return false
	}
	if watch != nil {
		return watch.wait(ctx, delay, before)
	}
	sleep(ctx, delay)
	return false
}

// sleep waits for d or until ctx is done, and reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// drain copies one upstream connection into sink until it ends or ctx is
// done, and returns why it ended, as the lost notice words it.
func drain(ctx context.Context, conn io.ReadWriteCloser, buf []byte, sink Sink, log hclog.Logger) string {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	// The sink first: once the log says connected, input reaches the VMM.
	sink.Connected(conn)
	if uc, ok := conn.(*net.UnixConn); ok {
		// Whoever this is gets the console's keystrokes: say who.
		cred := unixsock.PeerCred(uc)
		log.Info("upstream connected", "pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid)
	} else {
		log.Info("upstream connected")
	}
	var err error
	for {
		var n int
		n, err = conn.Read(buf)
		if n > 0 {
			sink.Output(buf[:n])
		}
		if err != nil {
			break
		}
	}
	// Closing first ends an input write blocked on a VMM that does not
	// read.
	conn.Close()
	reason := Reason(err)
	sink.Disconnected(reason, ctx.Err() != nil)
	return reason
}

// Reason words a read error as the lost notice gives it: EOF, or the
// system's text for the error without Go's operation and address prefix.
func Reason(err error) string {
	if errors.Is(err, io.EOF) {
		return "EOF"
	}
	var sys *os.SyscallError
	if errors.As(err, &sys) {
		return sys.Err.Error()
	}
	return err.Error()
}
