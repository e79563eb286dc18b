package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// copyBufSize is the most a client receives per write. Buffers come from a
// pool and are held only while a write is in flight, so an idle client costs
// no buffer and a stuck one costs one.
const copyBufSize = 64 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// inputBufSize bounds one read of client input, and so one write to the
// upstream.
const inputBufSize = 4 << 10

// refusalTimeout bounds the write of a refusal notice to a client that is
// about to be closed anyway.
const refusalTimeout = time.Second

// client is one connection on a served socket.
type client struct {
	p         *Proxy
	conn      net.Conn
	r         *Reader
	readOnly  bool
	log       hclog.Logger // the socket's, shared: a logger per client costs 384 bytes
	id        uint64
	socket    string
	cred      unix.Ucred
	connected time.Time

	closeOnce sync.Once
	running   atomic.Int32 // goroutines serving the client; see run
	writeErr  error        // why output ended; read by the last to end

	// Totals, atomic so that they can be reported while the client runs.
	bytesOut  atomic.Uint64
	bytesIn   atomic.Uint64 // input written to the upstream
	discarded atomic.Uint64 // input not sent: read-only, upstream down, or its queue full
}

// close ends both of the client's goroutines. Safe to call more than once
// and from any goroutine.
func (c *client) close() {
	c.closeOnce.Do(func() {
		c.r.Close()
		c.conn.Close()
	})
}

// Serve accepts read-write clients on ln until Shutdown or Close, then
// returns ErrClosed. Each client receives the replay and live output, and
// its input goes to the upstream. Serve takes ownership of ln.
func (p *Proxy) Serve(ln net.Listener) error { return p.serve(ln, false) }

// StopServing closes ln, served by Serve or ServeReadOnly, whose Serve then
// returns ErrClosed; its clients stay. For a socket replaced by another
// (its path was removed from under the proxy).
func (p *Proxy) StopServing(ln net.Listener) error {
	p.mu.Lock()
	_, serving := p.listeners[ln]
	delete(p.listeners, ln)
	p.mu.Unlock()
	if !serving {
		return nil
	}
	return ln.Close()
}

// ServeReadOnly is Serve for viewers: clients receive the same output, and
// their input is read, counted and discarded.
func (p *Proxy) ServeReadOnly(ln net.Listener) error { return p.serve(ln, true) }

func (p *Proxy) serve(ln net.Listener, readOnly bool) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	p.listeners[ln] = struct{}{}
	p.mu.Unlock()

	log := p.clientLog.With("socket", ln.Addr().String())
	delay := minRetry
	for {
		conn, err := ln.Accept()
		if err != nil {
			p.mu.Lock()
			_, serving := p.listeners[ln]
			closed := p.closed || !serving
			p.mu.Unlock()
			if closed {
				return ErrClosed
			}
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM) {
				// Out of descriptors: clients are waiting in the backlog;
				// retry once some close rather than spin.
				log.Warn("accept failed; retrying", "error", err, "delay", delay)
				time.Sleep(delay)
				delay = min(2*delay, maxRetry)
				continue
			}
			p.mu.Lock()
			delete(p.listeners, ln)
			p.mu.Unlock()
			ln.Close()
			return err
		}
		delay = minRetry
		p.admit(conn, ln.Addr().String(), readOnly, log)
	}
}

// admit starts serving conn, or refuses it when the proxy is full or
// closing.
func (p *Proxy) admit(conn net.Conn, socket string, readOnly bool, log hclog.Logger) {
	cred := unixsock.PeerCred(conn)
	// Access before capacity: a refused peer learns nothing about the
	// proxy's load.
	access := p.cfg.Access
	if readOnly && p.cfg.ReadOnlyAccess != nil {
		access = p.cfg.ReadOnlyAccess
	}
	if !access.Allows(cred) {
		p.deniedWarn.Warn("socket", socket, "pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid)
		refuse(conn, noticeDenied)
		return
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		conn.Close()
		return
	}
	if len(p.clients) >= p.cfg.MaxClients {
		p.mu.Unlock()
		p.fullWarn.Warn("socket", socket, "max", p.cfg.MaxClients, "pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid)
		refuse(conn, noticeTooMany(p.cfg.MaxClients))
		return
	}
	p.nextID++
	c := &client{
		p:         p,
		conn:      conn,
		readOnly:  readOnly,
		log:       log,
		id:        p.nextID,
		socket:    socket,
		cred:      cred,
		connected: time.Now(),
	}
	c.r = p.newReader(p.replayStartLocked(), !p.cfg.DisableNotices, p.cfg.SlowClient)
	p.clients[c] = struct{}{}
	replay := p.ring.End() - c.r.cursor
	p.clientsDone.Add(1)
	p.mu.Unlock()

	c.log.Info("client connected", "client", c.id, "pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid, "read_only", readOnly, "replay_bytes", replay)
	go c.run()
}

// refuse sends a refusal notice to a client that is then closed.
func refuse(conn net.Conn, text string) {
	conn.SetWriteDeadline(time.Now().Add(refusalTimeout))
	conn.Write(notice(text, true))
	conn.Close()
}

// run serves the client until it goes away or the proxy stops: one
// goroutine writes output, a second one reads input, and whichever ends
// last finishes the client. Neither waits for the other, so an idle client
// costs two parked goroutines and nothing more.
func (c *client) run() {
	c.running.Store(2)
	go func() {
		c.readInput()
		c.ended()
	}()
	c.writeErr = c.writeOutput()
	c.close()
	c.ended()
}

// ended is called once by each of the client's goroutines as it ends; the
// last one finishes the client. The atomic decrement orders the writer's
// writeErr before finish reads it.
func (c *client) ended() {
	if c.running.Add(-1) == 0 {
		c.finish(c.writeErr)
		c.p.clientsDone.Done()
	}
}

// finish removes the ended client, adds its figures to the totals and logs
// them. It is apart from run so that run's frame stays small: the writer
// parks under run for the client's whole life, and every byte of its frames
// counts against the initial 2 KiB goroutine stack, which an idle client
// would otherwise outgrow (a grown stack is 2 KiB more per client).
func (c *client) finish(err error) {
	p := c.p
	p.mu.Lock()
	delete(p.clients, c)
	final := c.statsLocked()
	p.totals.BytesOut += final.BytesOut
	p.totals.BytesIn += final.BytesIn
	p.totals.InputDiscarded += final.InputDiscarded
	p.totals.Dropped += final.Dropped
	p.mu.Unlock()
	reason := "closed"
	switch {
	case errors.Is(err, ErrTooSlow):
		reason = "too slow"
	case errors.Is(err, io.EOF):
		reason = "proxy stopping"
	}
	c.log.Info("client disconnected", "client", c.id, "reason", reason, "bytes_out", final.BytesOut, "bytes_in", final.BytesIn, "input_discarded", final.InputDiscarded, "dropped", final.Dropped)
}

// writeOutput sends the reader's walk to the client until either ends.
func (c *client) writeOutput() error {
	p := c.p
	for {
		p.mu.Lock()
		if err := c.r.waitLocked(); err != nil {
			p.mu.Unlock()
			return err
		}
		bp := copyBufs.Get().(*[]byte)
		n, err := c.r.readLocked(*bp)
		p.mu.Unlock()
		if err != nil {
			copyBufs.Put(bp)
			return err
		}
		_, err = c.conn.Write((*bp)[:n])
		copyBufs.Put(bp)
		if err != nil {
			return err
		}
		c.bytesOut.Add(uint64(n))
	}
}

// inputBufs holds client input buffers. A client takes one only while a
// read has data for it, so an idle client, waiting for input in the poller,
// holds none.
var inputBufs = sync.Pool{New: func() any { b := make([]byte, inputBufSize); return &b }}

// readInput forwards the client's input until it closes or half-closes. A
// half-closed client keeps receiving output; one that hung up entirely is
// closed at once rather than when the next output fails to reach it.
func (c *client) readInput() {
	for {
		bp, n, err := c.read()
		if n > 0 {
			if c.readOnly {
				c.discarded.Add(uint64(n))
			} else {
				c.p.queueInput((*bp)[:n], c) // counts what it discards
			}
		}
		if bp != nil {
			inputBufs.Put(bp)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				// EOF is a half-close or a hang-up: output goes on until
				// the peer has closed entirely, which ends the client at
				// once even while the console is quiet.
				waitHangUp(c.conn)
			}
			c.close()
			return
		}
	}
}

// read waits for input and reads it into a pooled buffer, which it returns
// for the caller to put back. It waits in the runtime's poller with no
// buffer taken.
func (c *client) read() (bp *[]byte, n int, err error) {
	raw, ok := rawConn(c.conn)
	if !ok {
		bp = inputBufs.Get().(*[]byte)
		n, err = c.conn.Read(*bp)
		return bp, n, err
	}
	var rerr error
	err = raw.Read(func(fd uintptr) bool {
		bp = inputBufs.Get().(*[]byte)
		for {
			n, rerr = unix.Read(int(fd), *bp)
			if rerr != unix.EINTR {
				break
			}
		}
		if rerr == unix.EAGAIN {
			inputBufs.Put(bp)
			bp = nil
			return false // wait for input, holding nothing
		}
		return true
	})
	switch {
	case err != nil:
		return bp, 0, err
	case rerr != nil:
		return bp, 0, rerr
	case n == 0:
		return bp, 0, io.EOF
	}
	return bp, n, nil
}

// waitHangUp blocks until the peer of conn has closed entirely or conn is
// closed; it returns at once when the peer already has. It parks in the
// runtime's poller: the kernel reports a peer's close as readiness
// (EPOLLHUP) even after EOF was read, and raises POLLHUP only when both
// directions are shut, so a half-close does not end the wait.
func waitHangUp(conn net.Conn) {
	if raw, ok := rawConn(conn); ok {
		raw.Read(func(fd uintptr) bool { return pollHUP(fd) })
	}
}

// rawConn returns conn's descriptor access, when it has one (net.Pipe in
// a test does not).
func rawConn(conn net.Conn) (syscall.RawConn, bool) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil, false
	}
	raw, err := sc.SyscallConn()
	return raw, err == nil
}

// pollHUP reports, without waiting, whether both directions of the socket
// at fd are shut.
func pollHUP(fd uintptr) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0 && fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
}
