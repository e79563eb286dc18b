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
	"sync"
	"time"

	"github.com/consoleproxy/consoleproxy/logsink"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/unixsock"
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
		Watcher:          cfg.Watcher,
		Logger:           log,
	}); err != nil {
		return nil, err
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
	if cfg.ListenRO != "" {
		if c.lnRO, err = unixsock.Listen(cfg.ListenRO, cfg.ROSocket); err != nil {
			return nil, fmt.Errorf("--listen-ro: %w", err)
		}
	}
	return c, nil
}

func bufferSize(cfg Config) int {
	if cfg.BufferSize == 0 {
		return proxy.DefaultBufferSize
	}
	return cfg.BufferSize
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
	serveErr := make(chan error, 2)
	serve := func(run func() error, flag string) {
		serving.Go(func() {
			if err := run(); err != nil && !errors.Is(err, proxy.ErrClosed) {
				serveErr <- fmt.Errorf("%s: accept: %w", flag, err)
			}
		})
	}
	serve(func() error { return c.p.Serve(c.ln) }, "--listen")
	if c.lnRO != nil {
		serve(func() error { return c.p.ServeReadOnly(c.lnRO) }, "--listen-ro")
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
