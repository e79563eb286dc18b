// Command consoleproxy owns a virtual machine's single-client serial console
// socket and re-exports it to many clients at once, with the recent history
// replayed to each one. See the README for the full contract.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/consoleproxy/consoleproxy/logsink"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/hashicorp/go-hclog"
	"github.com/oklog/run"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

// drainTimeout bounds how long a stopping proxy keeps sending clients what
// the ring holds for them.
const drainTimeout = time.Second

// logDrainTimeout bounds how long a stopping proxy waits for the console
// log to catch up.
const logDrainTimeout = 5 * time.Second

func main() {
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

// signals are the ones the daemon handles, registered before anything that
// can take time: the default action of each kills the process, and a
// SIGHUP from logrotate or a SIGTERM from a supervisor may come at any
// moment, start-up included.
type signals struct {
	term, hup, usr1 chan os.Signal
}

func notifySignals() *signals {
	s := &signals{term: make(chan os.Signal, 1), hup: make(chan os.Signal, 1), usr1: make(chan os.Signal, 1)}
	signal.Notify(s.term, os.Interrupt, syscall.SIGTERM)
	signal.Notify(s.hup, syscall.SIGHUP)
	signal.Notify(s.usr1, syscall.SIGUSR1)
	// A reader of stderr that goes away (consoleproxy ... 2>&1 | head)
	// must not kill the console: writes then fail with EPIPE, which the
	// daemon log copes with.
	signal.Ignore(syscall.SIGPIPE)
	return s
}

func (s *signals) stop() {
	signal.Stop(s.term)
	signal.Stop(s.hup)
	signal.Stop(s.usr1)
}

// runMain runs the daemon, or the attach client when args start with
// "attach", and returns its exit status: 0 for a clean stop, 1 for a
// runtime failure, 2 for a usage error.
func runMain(args []string, stdout, stderr io.Writer) int {
	// The client shares the binary, so it is wherever the daemon is. It
	// handles signals of its own, so it goes before the daemon's.
	if len(args) > 0 && args[0] == "attach" {
		return runAttach(args[1:], os.Stdin, stdout, stderr)
	}
	sigs := notifySignals()
	defer sigs.stop()
	o, err := parseArgs(args)
	if err != nil {
		fmt.Fprintf(stderr, "consoleproxy: %v (see consoleproxy --help)\n", err)
		return 2
	}
	switch {
	case o.help:
		fmt.Fprint(stdout, usageText)
		return 0
	case o.version:
		fmt.Fprintln(stdout, "consoleproxy", versionString())
		return 0
	}
	logOut := newLineQueue(stderr)
	defer logOut.Close()
	log := hclog.New(&hclog.LoggerOptions{
		Name:       "consoleproxy",
		Level:      o.logLevel,
		JSONFormat: o.logJSON,
		Output:     logOut,
	})
	logOut.log = log
	if err := serve(o, log, sigs); err != nil {
		log.Error("failed", "error", err)
		return 1
	}
	return 0
}

// serve binds everything, runs the proxy until a signal or the upstream's
// end, and shuts it down in order.
//
// The signals were registered by the caller (see notifySignals), so a
// SIGTERM during start-up is a clean stop once the group runs.
func serve(o *options, log hclog.Logger, sigs *signals) error {
	term, hup, usr1 := sigs.term, sigs.hup, sigs.usr1
	started := time.Now()

	var (
		clog *logsink.Log
		seed []byte
		err  error
	)
	if o.consoleLog != "" {
		if seed, err = logsink.ReadTail(o.consoleLog, o.bufferSize, o.logOptions.Timestamps); err != nil {
			return fmt.Errorf("--console-log: %w", err)
		}
		if clog, err = logsink.Open(o.consoleLog, o.logOptions); err != nil {
			return fmt.Errorf("--console-log: %w", err)
		}
		// Closed after the group has stopped and the log writer flushed.
		defer func() {
			if err := clog.Close(); err != nil {
				log.Error("close console log", "error", err)
			}
		}()
	}
	access, err := resolveAccess("--allow-uid", o.allowUIDs, "--allow-gid", o.allowGIDs)
	if err != nil {
		return err
	}
	roAccess, err := resolveAccess("--ro-allow-uid", o.roAllowUIDs, "--ro-allow-gid", o.roAllowGIDs)
	if err != nil {
		return err
	}
	p, err := proxy.New(proxy.Config{
		Upstream:         o.upstream,
		BufferSize:       o.bufferSize,
		Replay:           o.replay,
		SlowClient:       o.slowClient,
		MaxClients:       o.maxClients,
		Access:           access,
		ReadOnlyAccess:   roAccess,
		DisableNotices:   !o.notices,
		ExitWithUpstream: o.exitWithUpstream,
		Seed:             seed,
		Logger:           log,
	})
	if err != nil {
		return err
	}
	// Bind before anything runs, so that a socket in the way fails the start
	// instead of a running daemon. RunUpstream closes the listen: socket.
	if lu, ok := o.upstream.(*proxy.ListenUpstream); ok {
		lu.Socket = o.socket
		lu.Access = access
		if err := lu.Listen(); err != nil {
			return fmt.Errorf("--upstream: %w", err)
		}
	}
	ln, err := proxy.Listen(o.listen, o.socket)
	if err != nil {
		closeUpstream(o.upstream)
		return fmt.Errorf("--listen: %w", err)
	}
	var lnRO *proxy.SocketListener
	if o.listenRO != "" {
		if lnRO, err = proxy.Listen(o.listenRO, o.roSocket); err != nil {
			ln.Close()
			closeUpstream(o.upstream)
			return fmt.Errorf("--listen-ro: %w", err)
		}
	}
	log.Info("started", "version", versionString(), "upstream", o.upstream.String(), "listen", o.listen, "listen_ro", o.listenRO, "buffer_size", o.bufferSize)

	// Actors are interrupted in the order they are added, which is the
	// shutdown order.
	var g run.Group
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Signals: SIGINT or SIGTERM ends the group with a clean stop.
	g.Add(func() error {
		select {
		case sig := <-term:
			return stopSignal{sig}
		case <-ctx.Done():
			return ctx.Err()
		}
	}, func(error) { cancel() })

	// Upstream: stopped first, and waited for, so the ring stops growing
	// and clients can be drained to its end. With --exit-with-upstream its
	// end is what ends the group.
	{
		upCtx, upCancel := context.WithCancel(ctx)
		upDone := make(chan struct{})
		g.Add(func() error {
			defer close(upDone)
			return p.RunUpstream(upCtx)
		}, func(error) {
			upCancel()
			<-upDone
		})
	}

	// Clients: stop accepting, send every client what the ring holds for it
	// (at most drainTimeout), close them, and remove our socket files.
	g.Add(func() error {
		return serveErr(p.Serve(ln), "--listen")
	}, func(error) {
		sctx, scancel := context.WithTimeout(context.Background(), drainTimeout)
		defer scancel()
		if err := p.Shutdown(sctx); errors.Is(err, context.DeadlineExceeded) {
			log.Warn("clients did not take all output before the drain timeout", "timeout", drainTimeout)
		} else if err != nil {
			log.Warn("shutdown", "error", err)
		}
	})
	if lnRO != nil {
		// Read-only clients: the same shutdown already closed this socket.
		g.Add(func() error {
			return serveErr(p.ServeReadOnly(lnRO), "--listen-ro")
		}, func(error) {})
	}

	// Operator signals: SIGHUP reopens the console log (after an external
	// rotation); SIGUSR1 logs one line per client and a totals line.
	{
		sigCtx, sigCancel := context.WithCancel(ctx)
		g.Add(func() error {
			for {
				select {
				case <-hup:
					if clog == nil {
						log.Info("SIGHUP: there is no console log to reopen")
					} else if err := clog.Reopen(); err != nil {
						log.Error("reopen console log", "error", err)
					} else {
						log.Info("console log reopened")
					}
				case <-usr1:
					logStats(log, p.Stats(), time.Since(started))
				case <-sigCtx.Done():
					return nil
				}
			}
		}, func(error) { sigCancel() })
	}

	if clog != nil {
		// Console log: stopped last, so it receives everything the upstream
		// produced, the VM's last words and the lost notice included; it
		// gets logDrainTimeout to write it out (a failing disk must not hold
		// the stop forever). Its context is not the group's: the first
		// interrupt cancels that one, and the log would stop before it had
		// caught up. It ends on its own once Shutdown has begun and it has
		// written everything.
		logCtx, logCancel := context.WithCancel(context.Background())
		logDone := make(chan struct{})
		g.Add(func() error {
			defer close(logDone)
			return p.RunLog(logCtx, clog)
		}, func(error) {
			select {
			case <-logDone:
			case <-time.After(logDrainTimeout):
				log.Warn("console log did not catch up before stopping", "timeout", logDrainTimeout)
			}
			logCancel()
			<-logDone
		})
	}

	err = g.Run()
	var sig stopSignal
	if errors.As(err, &sig) {
		log.Info("stopped", "signal", sig.String())
		return nil
	}
	return err
}

func logStats(log hclog.Logger, s proxy.Stats, uptime time.Duration) {
	for _, c := range s.Clients {
		log.Info("client", "client", c.ID, "socket", c.Socket, "pid", c.PID, "uid", c.UID, "gid", c.GID,
			"read_only", c.ReadOnly, "connected_for", time.Since(c.Connected).Round(time.Second),
			"bytes_out", c.BytesOut, "bytes_in", c.BytesIn, "input_discarded", c.InputDiscarded, "dropped", c.Dropped)
	}
	log.Info("totals", "uptime", uptime.Round(time.Second), "clients", len(s.Clients), "clients_served", s.ClientsServed,
		"upstream_up", s.UpstreamUp, "upstream_connects", s.UpstreamConnects, "upstream_bytes", s.UpstreamBytes,
		"bytes_out", s.BytesOut, "bytes_in", s.BytesIn, "input_discarded", s.InputDiscarded, "dropped", s.Dropped,
		"goroutines", s.Goroutines)
}

// stopSignal ends the group on SIGINT or SIGTERM: a clean stop.
type stopSignal struct{ os.Signal }

func (s stopSignal) Error() string { return "received " + s.String() }

// resolveAccess looks up the names of an allow-uid and allow-gid pair of
// flags; nil lists mean no such rule. Names that do not exist are found on
// the system, so they are runtime failures.
func resolveAccess(uidFlag string, uids []string, gidFlag string, gids []string) (*proxy.Access, error) {
	if uids == nil && gids == nil {
		return nil, nil
	}
	var a proxy.Access
	var err error
	if a.UIDs, err = proxy.LookupUIDs(uids); err != nil {
		return nil, fmt.Errorf("%s: %w", uidFlag, err)
	}
	if a.GIDs, err = proxy.LookupGIDs(gids); err != nil {
		return nil, fmt.Errorf("%s: %w", gidFlag, err)
	}
	return &a, nil
}

// closeUpstream releases an upstream that holds a socket (listen:), for
// start-up failures after it was bound.
func closeUpstream(up proxy.Upstream) {
	if c, ok := up.(io.Closer); ok {
		c.Close()
	}
}

// serveErr maps the normal end of Serve to nil.
func serveErr(err error, flag string) error {
	if errors.Is(err, proxy.ErrClosed) {
		return nil
	}
	return fmt.Errorf("%s: accept: %w", flag, err)
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "unknown"
}
