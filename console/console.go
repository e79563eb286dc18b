// Package console runs one console: the unit that both of consoleproxy's
// modes are made of. A Console owns, for one VM, the console log (seeded
// into the ring at start), the fan-out proxy with its upstream, the client
// sockets, and the order in which they stop.
//
// It is not the process: it handles no signals and keeps no process-wide
// state. The caller (the daemon's main for one console, package host for
// many) opens it, runs it, reopens its log on SIGHUP and reads its Stats.
package console

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/consoleproxy/consoleproxy/logsink"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/warnlimit"
	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
)

// Stop budgets, as the contract gives them: clients get what the ring
// holds for them for at most DrainTimeout; the log gets LogDrainTimeout to
// write out the rest (a failing disk must not hold the stop forever).
const (
	DrainTimeout    = time.Second
	LogDrainTimeout = 5 * time.Second
)

// ErrNoLog is returned by ReopenLog for a console without a log.
var ErrNoLog = errors.New("no console log")

// Config describes one console. Zero fields mean the defaults of package
// proxy.
type Config struct {
	// Name is what host mode's pattern matched; "" for a single console.
	Name     string
	Upstream proxy.Upstream
	// Listen is the read-write client socket; required. ListenRO, when
	// set, is the read-only one.
	Listen, ListenRO string
	// Socket applies to Listen and to a listen: upstream, ROSocket to
	// ListenRO.
	Socket, ROSocket unixsock.SocketOptions
	// Access applies to Listen, ROAccess to ListenRO.
	Access, ROAccess *unixsock.Access
	// ConsoleLog, when set, is the console log's path.
	ConsoleLog string
	LogOptions logsink.Options

	BufferSize       int
	Replay           proxy.ReplaySize
	SlowClient       proxy.SlowClientPolicy
	MaxClients       int
	DisableNotices   bool
	ExitWithUpstream bool

	// KeepSockets creates a client socket again when it is removed from
	// under the proxy, once its directory has been quiet for a moment (an
	// rm -rf of the directory is left to finish).
	KeepSockets bool

	// Watcher is the process's shared inotify watcher.
	Watcher *watch.Watcher
	// Logger receives the console's diagnostics. Nil means none.
	Logger hclog.Logger
}

// Console is one opened console. Run it once; its other methods are safe
// for concurrent use, before, during and after Run.
type Console struct {
	cfg  Config
	log  hclog.Logger
	p    *proxy.Proxy
	clog *logsink.Log // nil without a log
	ln   *unixsock.SocketListener
	lnRO *unixsock.SocketListener

	retireOnce sync.Once
	retire     chan struct{} // closed by Retire
}

// Open prepares the console: it seeds the ring from the console log, opens
// the log, and binds the sockets (a listen: upstream's too), so that
// everything that can fail on the system fails here, before anything runs.
// On error nothing is left open or bound.
func Open(cfg Config) (_ *Console, err error) {
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	c := &Console{cfg: cfg, log: log, retire: make(chan struct{})}
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	var seed []byte
	if cfg.ConsoleLog != "" {
		if seed, err = logsink.ReadTail(cfg.ConsoleLog, bufferSize(cfg), cfg.LogOptions.Timestamps); err != nil {
			return nil, fmt.Errorf("--console-log: %w", err)
		}
		if c.clog, err = logsink.Open(cfg.ConsoleLog, cfg.LogOptions); err != nil {
			return nil, fmt.Errorf("--console-log: %w", err)
		}
		undo = append(undo, func() { c.clog.Close() })
	}
	if lu, ok := cfg.Upstream.(*proxy.ListenUpstream); ok {
		if err := lu.Listen(); err != nil {
			return nil, fmt.Errorf("--upstream: %w", err)
		}
		undo = append(undo, func() { lu.Close() })
	}
	if c.ln, err = unixsock.Listen(cfg.Listen, cfg.Socket); err != nil {
		return nil, fmt.Errorf("--listen: %w", err)
	}
	undo = append(undo, func() { c.ln.Close() })
	own := []*unixsock.SocketListener{c.ln}
	if cfg.ListenRO != "" {
		if c.lnRO, err = unixsock.Listen(cfg.ListenRO, cfg.ROSocket); err != nil {
			return nil, fmt.Errorf("--listen-ro: %w", err)
		}
		undo = append(undo, func() { c.lnRO.Close() })
		own = append(own, c.lnRO)
	}
	if c.p, err = proxy.New(proxy.Config{
		Upstream:         cfg.Upstream,
		BufferSize:       cfg.BufferSize,
		Replay:           cfg.Replay,
		SlowClient:       cfg.SlowClient,
		MaxClients:       cfg.MaxClients,
		Access:           cfg.Access,
		ReadOnlyAccess:   cfg.ROAccess,
		DisableNotices:   cfg.DisableNotices,
		ExitWithUpstream: cfg.ExitWithUpstream,
		Seed:             seed,
		OwnSockets:       own,
		Watcher:          cfg.Watcher,
		Logger:           log,
	}); err != nil {
		return nil, err
	}
	return c, nil
}

func bufferSize(cfg Config) int {
	if cfg.BufferSize == 0 {
		return proxy.DefaultBufferSize
	}
	return cfg.BufferSize
}

// Serves reports whether path names one of the console's client sockets.
func (c *Console) Serves(path string) bool {
	return c.ln.Names(path) || (c.lnRO != nil && c.lnRO.Names(path))
}

// Name returns the console's name.
func (c *Console) Name() string { return c.cfg.Name }

// Run serves the console until ctx is done, Retire is called, or (with
// ExitWithUpstream) the upstream's first connection ends, and then stops it
// in order: the upstream first, so the ring stops growing; then the clients,
// who get what the ring holds for them within DrainTimeout; then the log,
// last, so that it has everything, within LogDrainTimeout; the socket files
// are removed if they are still ours. It returns nil for those ends, or
// the error that ended a socket. Call it once.
func (c *Console) Run(ctx context.Context) error {
	upCtx, upCancel := context.WithCancel(ctx)
	defer upCancel()
	upDone := make(chan error, 1)
	go func() { upDone <- c.p.RunUpstream(upCtx) }()

	var serving sync.WaitGroup
	serveErr := make(chan error, 1)
	serve := func(run func() error, flag string) {
		serving.Go(func() {
			if err := run(); err != nil && !errors.Is(err, proxy.ErrClosed) {
				select {
				case serveErr <- fmt.Errorf("%s: accept: %w", flag, err):
				default: // the first one ends Run
				}
			}
		})
	}
	serve(func() error { return c.p.Serve(c.ln) }, "--listen")
	if c.lnRO != nil {
		serve(func() error { return c.p.ServeReadOnly(c.lnRO) }, "--listen-ro")
	}
	// A client socket removed from under the proxy is created again.
	stopKeeping := make(chan struct{})
	var keeping sync.WaitGroup
	keeping.Go(c.keepSocket(stopKeeping, c.ln, c.cfg.Socket, func(ln *unixsock.SocketListener) {
		serve(func() error { return c.p.Serve(ln) }, "--listen")
	}))
	if c.lnRO != nil {
		keeping.Go(c.keepSocket(stopKeeping, c.lnRO, c.cfg.ROSocket, func(ln *unixsock.SocketListener) {
			serve(func() error { return c.p.ServeReadOnly(ln) }, "--listen-ro")
		}))
	}
	// The log's context is not ctx: the log ends on its own once the
	// clients' shutdown has begun and it has written everything, or at its
	// budget.
	logCtx, logCancel := context.WithCancel(context.Background())
	defer logCancel()
	logDone := make(chan error, 1)
	if c.clog != nil {
		go func() { logDone <- c.p.RunLog(logCtx, c.clog) }()
	}

	var err error
	retired := false
	select {
	case <-ctx.Done():
	case <-c.retire:
		retired = true
	case err = <-upDone:
		upDone = nil
	case err = <-serveErr:
	}

	close(stopKeeping)
	keeping.Wait()
	upCancel()
	if upDone != nil {
		<-upDone
	}
	if retired {
		c.p.Retire()
	}
	sctx, scancel := context.WithTimeout(context.Background(), DrainTimeout)
	if serr := c.p.Shutdown(sctx); errors.Is(serr, context.DeadlineExceeded) {
		c.log.Warn("clients did not take all output before the drain timeout", "timeout", DrainTimeout)
	} else if serr != nil {
		c.log.Warn("shutdown", "error", serr)
	}
	scancel()
	serving.Wait()
	if c.clog != nil {
		select {
		case <-logDone:
		case <-time.After(LogDrainTimeout):
			c.log.Warn("console log did not catch up before stopping", "timeout", LogDrainTimeout)
			logCancel()
			<-logDone
		}
		if cerr := c.clog.Close(); cerr != nil {
			c.log.Error("close console log", "error", cerr)
		}
	}
	return err
}

// quiet waits until busy has stayed silent for socketSettle, and reports
// false when stop is closed or the directory is gone meanwhile.
func quiet(stop, gone <-chan struct{}, busy <-chan struct{}) bool {
	settle := time.NewTimer(socketSettle)
	defer settle.Stop()
	for {
		select {
		case <-stop:
			return false
		case <-gone:
			return false
		case <-busy:
			settle.Reset(socketSettle)
		case <-settle.C:
			return true
		}
	}
}

// socketSettle is how long the directory of a removed client socket must
// stay quiet before the socket is created again: an rm -rf of the
// directory keeps it busy until it is gone.
const socketSettle = 250 * time.Millisecond

// keepSocket watches the directory of ln's socket and returns the loop
// that creates the socket again when its path is removed from under the
// proxy (by hand, or a tmpfiles clean-up), so that clients can still find
// the console and a second instance cannot start beside this one. The
// watch begins before keepSocket returns; the loop serves each new socket
// with serve, and returns when stop is closed or the socket's directory
// goes. The socket it replaces is closed.
func (c *Console) keepSocket(stop <-chan struct{}, ln *unixsock.SocketListener, opts unixsock.SocketOptions, serve func(*unixsock.SocketListener)) func() {
	if c.cfg.Watcher == nil || !c.cfg.KeepSockets {
		return func() {}
	}
	path := ln.Addr().String()
	name := filepath.Base(path)
	changed := make(chan struct{}, 1) // the socket's name
	changed <- struct{}{}             // what happened before the watch began
	busy := make(chan struct{}, 1)    // anything in the directory
	gone := make(chan struct{})
	var goneOnce sync.Once
	signal := func(ch chan struct{}) {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	cancel, err := c.cfg.Watcher.Watch(filepath.Dir(path), func(e watch.Event) {
		switch {
		case e.Gone:
			goneOnce.Do(func() { close(gone) })
		case e.Name == name || e.Overflow:
			signal(changed)
			signal(busy)
		default:
			signal(busy)
		}
	})
	if err != nil {
		c.log.Warn("cannot watch the client socket's directory; a socket removed from under the proxy stays gone", "socket", path, "error", err)
		return func() {}
	}
	recreated := warnlimit.New(c.log, "the client socket was removed from under the proxy; created it again")
	return func() {
		defer cancel()
		defer recreated.Stop()
		warned := false
		for {
			select {
			case <-stop:
				return
			case <-gone:
				return
			case <-changed:
			}
			if ln.Ours() {
				continue
			}
			// An rm -rf of the whole directory removes the socket first:
			// creating it again then would make the rm fail (directory not
			// empty). Wait until the directory has been quiet for a
			// moment, and is still there.
			if !quiet(stop, gone, busy) {
				return
			}
			if ln.Ours() {
				continue
			}
			if _, err := os.Stat(filepath.Dir(path)); err != nil {
				return
			}
			if _, err := os.Lstat(path); err == nil {
				if !warned {
					c.log.Warn("the client socket's path names something else now; leaving it alone", "socket", path)
					warned = true
				}
				continue
			}
			next, err := unixsock.Listen(path, opts)
			if err != nil {
				c.log.Error("the client socket was removed and cannot be created again", "socket", path, "error", err)
				continue
			}
			recreated.Warn("socket", path)
			c.p.StopServing(ln) // nobody can reach it any more
			serve(next)
			ln, warned = next, false
		}
	}
}

// Retire ends Run as host mode retires a console: its clients receive the
// console retired notice before they are closed. Safe to call more than
// once, and before Run.
func (c *Console) Retire() {
	c.retireOnce.Do(func() { close(c.retire) })
}

// ReopenLog closes and reopens the console log, after an external
// rotation. It returns ErrNoLog for a console without one.
func (c *Console) ReopenLog() error {
	if c.clog == nil {
		return ErrNoLog
	}
	return c.clog.Reopen()
}

// Stats describes the console for SIGUSR1 and the status socket.
type Stats struct {
	Name       string
	Upstream   string
	Listen     string
	ListenRO   string
	ConsoleLog string
	proxy.Stats
}

// Stats returns a snapshot of the console's figures. It never waits for
// I/O.
func (c *Console) Stats() Stats {
	return Stats{
		Name:       c.cfg.Name,
		Upstream:   c.cfg.Upstream.String(),
		Listen:     c.cfg.Listen,
		ListenRO:   c.cfg.ListenRO,
		ConsoleLog: c.cfg.ConsoleLog,
		Stats:      c.p.Stats(),
	}
}
