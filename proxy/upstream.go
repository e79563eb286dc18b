package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
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

// MaxSocketPath is the longest Unix socket path the kernel accepts: the size
// of sun_path less its terminating NUL.
const MaxSocketPath = 107

// ParseUpstream turns an --upstream spec into an Upstream. Supported:
// unix:PATH. A bare PATH is accepted when it names an existing socket.
func ParseUpstream(spec string) (Upstream, error) {
	kind, rest, found := strings.Cut(spec, ":")
	if !found || strings.Contains(kind, "/") {
		return parseBarePath(spec)
	}
	switch kind {
	case "unix":
		if err := CheckSocketPath(rest); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadSpec, err)
		}
		return &UnixUpstream{Path: rest}, nil
	case "pty", "listen", "tcp":
		return nil, fmt.Errorf("%w: %q: the %s: upstream is not supported yet", ErrBadSpec, spec, kind)
	}
	return nil, fmt.Errorf("%w: %q: unknown kind %q (want unix:PATH)", ErrBadSpec, spec, kind)
}

func parseBarePath(path string) (Upstream, error) {
	if path == "" {
		return nil, fmt.Errorf("%w: empty", ErrBadSpec)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %q has no kind prefix (unix:PATH) and cannot be inspected: %w", ErrBadSpec, path, err)
	}
	if fi.Mode().Type() == os.ModeSocket {
		return ParseUpstream("unix:" + path)
	}
	return nil, fmt.Errorf("%w: %q has no kind prefix and is not a socket (want unix:PATH)", ErrBadSpec, path)
}

// CheckSocketPath reports whether path can name a Unix socket: not empty and
// no longer than MaxSocketPath bytes.
func CheckSocketPath(path string) error {
	switch {
	case path == "":
		return errors.New("empty socket path")
	case len(path) > MaxSocketPath:
		return fmt.Errorf("socket path %s is %d bytes, longer than the system limit of %d", path, len(path), MaxSocketPath)
	}
	return nil
}

// UnixUpstream connects to a socket the VMM listens on (Cloud Hypervisor's
// --serial socket=PATH, QEMU's -chardev socket,server=on).
type UnixUpstream struct {
	Path string
}

// Dial connects to Path once.
func (u *UnixUpstream) Dial(ctx context.Context) (io.ReadWriteCloser, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", u.Path)
}

func (u *UnixUpstream) String() string { return "unix:" + u.Path }

// Reconnect timing. A VMM that restarts is reattached after minBackoff; a
// VMM that keeps refusing or dropping us is retried at most every
// maxBackoff. The backoff resets only after a connection has stayed up for
// stableAfter, so a VMM that accepts and at once drops us cannot make the
// proxy spin.
const (
	minBackoff  = 10 * time.Millisecond
	maxBackoff  = time.Second
	stableAfter = 5 * time.Second
)

// upstreamReadSize is the read size on the upstream: large enough that a
// flood costs few wake-ups, small enough to stay cache-resident.
const upstreamReadSize = 64 << 10

// RunUpstream keeps the upstream connected and drains it into the ring until
// ctx is done, then returns nil. It reconnects with backoff after failures
// and lost connections; with ExitWithUpstream it returns nil once the first
// connection ends. Call it once.
func (p *Proxy) RunUpstream(ctx context.Context) error {
	log := p.log.Named("upstream").With("upstream", p.cfg.Upstream.String())
	buf := make([]byte, upstreamReadSize)
	delay := minBackoff
	failures := 0
	for {
		conn, err := p.cfg.Upstream.Dial(ctx)
		if ctx.Err() != nil {
			if err == nil {
				conn.Close()
			}
			return nil
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
			if !sleep(ctx, delay) {
				return nil
			}
			delay = min(2*delay, maxBackoff)
			continue
		}
		failures = 0
		connected := time.Now()
		reason := p.drain(ctx, conn, buf, log)
		if ctx.Err() != nil {
			return nil
		}
		up := time.Since(connected)
		log.Info("upstream lost", "reason", reason, "uptime", up.Round(time.Millisecond))
		p.appendNotice(noticeLost(reason))
		if p.cfg.ExitWithUpstream {
			return nil
		}
		if up >= stableAfter {
			delay = minBackoff
		}
		if !sleep(ctx, delay) {
			return nil
		}
		delay = min(2*delay, maxBackoff)
	}
}

// drain copies one upstream connection into the ring until it ends or ctx is
// done, and returns why it ended, as the lost notice words it.
func (p *Proxy) drain(ctx context.Context, conn io.ReadWriteCloser, buf []byte, log hclog.Logger) string {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	p.inputMu.Lock()
	p.upstream = conn
	discarded := p.discarded
	p.discarded = 0
	p.inputMu.Unlock()
	if discarded > 0 {
		log.Info("upstream connected", "input_discarded_while_down", discarded)
	} else {
		log.Info("upstream connected")
	}
	p.appendNotice(noticeConnected)

	var err error
	for {
		var n int
		n, err = conn.Read(buf)
		if n > 0 {
			p.appendOutput(buf[:n])
		}
		if err != nil {
			break
		}
	}
	// Close before taking inputMu: an input write blocked on a VMM that does
	// not read holds inputMu, and closing is what unblocks it.
	conn.Close()
	p.inputMu.Lock()
	p.upstream = nil
	p.inputMu.Unlock()
	return lostReason(err)
}

// lostReason words a read error for the lost notice: EOF, or the system's
// text for the error without Go's operation and address prefix.
func lostReason(err error) string {
	if errors.Is(err, io.EOF) {
		return "EOF"
	}
	var sys *os.SyscallError
	if errors.As(err, &sys) {
		return sys.Err.Error()
	}
	return err.Error()
}

// writeInput writes one client read to the upstream, whole. It reports
// whether the bytes were sent; while the upstream is down they are counted
// as discarded.
func (p *Proxy) writeInput(b []byte) bool {
	p.inputMu.Lock()
	defer p.inputMu.Unlock()
	if p.upstream != nil {
		if _, err := p.upstream.Write(b); err == nil {
			return true
		}
		// The read side sees the same failure and reports the loss.
	}
	p.discarded += uint64(len(b))
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
