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
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/consoleproxy/consoleproxy/console"
	"github.com/consoleproxy/consoleproxy/host"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/status"
	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/upstream"
	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
	"github.com/oklog/run"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

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

// serve opens the console (or, with a pattern, the host's discovery),
// runs it until a signal or the upstream's end, and stops it in order.
//
// The signals were registered by the caller (see notifySignals), so a
// SIGTERM during start-up is a clean stop once the group runs.
func serve(o *options, log hclog.Logger, sigs *signals) error {
	started := time.Now()
	access, err := resolveAccess("--allow-uid", o.allowUIDs, "--allow-gid", o.allowGIDs)
	if err != nil {
		return err
	}
	roAccess, err := resolveAccess("--ro-allow-uid", o.roAllowUIDs, "--ro-allow-gid", o.roAllowGIDs)
	if err != nil {
		return err
	}
	// The process's one inotify instance, shared by every wait.
	watcher := watch.New()
	defer watcher.Close()
	var statusLn *unixsock.SocketListener
	if o.status != "" {
		if statusLn, err = unixsock.Listen(o.status, o.socket); err != nil {
			return fmt.Errorf("--status: %w", err)
		}
	}

	// consoleConfig is the console for one upstream path; with a pattern,
	// for one match.
	consoleConfig := func(name string, up proxy.Upstream, path string) console.Config {
		expand := func(s string) string {
			if s == "" || o.pattern == nil {
				return s
			}
			return host.Expand(s, name, path)
		}
		clog := log
		if o.pattern != nil {
			clog = log.With("console", name)
		}
		return console.Config{
			Name: name, Upstream: up,
			Listen: expand(o.listen), ListenRO: expand(o.listenRO),
			Socket: o.socket, ROSocket: o.roSocket,
			Access: access, ROAccess: roAccess,
			ConsoleLog: expand(o.consoleLog), LogOptions: o.logOptions,
			BufferSize: o.bufferSize, Replay: o.replay, SlowClient: o.slowClient, MaxClients: o.maxClients,
			DisableNotices: !o.notices, ExitWithUpstream: o.exitWithUpstream,
			KeepSockets: true,
			Watcher:     watcher, Logger: clog,
		}
	}

	// Actors are interrupted in the order they are added, which is the
	// shutdown order.
	var g run.Group
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Signals: SIGINT or SIGTERM ends the group with a clean stop.
	g.Add(func() error {
		select {
		case sig := <-sigs.term:
			return stopSignal{sig}
		case <-ctx.Done():
			return ctx.Err()
		}
	}, func(error) { cancel() })

	// The consoles: each stops in order when ctx is done (its upstream,
	// then its clients, within 1 s, then its log, within 5 s), all of them
	// at once. With --exit-with-upstream a single console's end is what
	// ends the group.
	var consoles func() []*console.Console
	if o.pattern != nil {
		h := host.New(host.Config{
			Pattern: *o.pattern,
			Console: func(name, path string) (console.Config, error) {
				// The kind was checked with the pattern; the path, too
				// long for a socket say, only now.
				up, err := upstream.ParseUpstream(o.upstreamKind + ":" + path)
				if err != nil {
					return console.Config{}, err
				}
				return consoleConfig(name, up, path), nil
			},
			IsOwn: func(path string) bool {
				return statusLn != nil && statusLn.Names(path)
			},
			MaxConsoles: o.maxConsoles,
			RetireAfter: o.retireAfter,
			Watcher:     watcher,
			Logger:      log,
		})
		consoles = h.Consoles
		g.Add(func() error { return h.Run(ctx) }, func(error) { cancel() })
		log.Info("started", "version", versionString(), "pattern", o.upstreamKind+":"+o.pattern.String(),
			"listen", o.listen, "listen_ro", o.listenRO, "buffer_size", o.bufferSize, "max_consoles", o.maxConsoles)
	} else {
		if lu, ok := o.upstream.(*upstream.ListenUpstream); ok {
			// Whoever connects there is the VMM: the client rules apply.
			lu.Socket, lu.Access = o.socket, access
		}
		// Bound and opened before anything runs, so that a socket or a log
		// in the way fails the start instead of a running daemon.
		c, err := console.Open(consoleConfig("", o.upstream, ""))
		if err != nil {
			if statusLn != nil {
				statusLn.Close()
			}
			return err
		}
		consoles = func() []*console.Console { return []*console.Console{c} }
		g.Add(func() error { return c.Run(ctx) }, func(error) { cancel() })
		log.Info("started", "version", versionString(), "upstream", o.upstream.String(), "listen", o.listen, "listen_ro", o.listenRO, "buffer_size", o.bufferSize)
	}

	// Status socket: one JSON document per connection.
	if statusLn != nil {
		g.Add(func() error {
			return status.Serve(statusLn, access, func() status.Document {
				stats := make([]console.Stats, 0)
				for _, c := range consoles() {
					stats = append(stats, c.Stats())
				}
				return status.NewDocument(versionString(), time.Since(started), stats)
			}, log.Named("status"))
		}, func(error) { statusLn.Close() })
	}

	// Operator signals: SIGHUP reopens every console log (after an external
	// rotation); SIGUSR1 logs one line per console and per client.
	{
		sigCtx, sigCancel := context.WithCancel(ctx)
		g.Add(func() error {
			for {
				select {
				case <-sigs.hup:
					reopenLogs(log, consoles())
				case <-sigs.usr1:
					logStats(log, consoles(), o.pattern != nil, time.Since(started))
				case <-sigCtx.Done():
					return nil
				}
			}
		}, func(error) { sigCancel() })
	}

	err = g.Run()
	var sig stopSignal
	if errors.As(err, &sig) {
		log.Info("stopped", "signal", sig.String())
		return nil
	}
	return err
}

// reopenLogs reopens every console's log, saying so once for a console
// without one.
func reopenLogs(log hclog.Logger, consoles []*console.Console) {
	reopened, failed := 0, 0
	for _, c := range consoles {
		clog := log
		if c.Name() != "" {
			clog = log.With("console", c.Name())
		}
		switch err := c.ReopenLog(); {
		case errors.Is(err, console.ErrNoLog), errors.Is(err, os.ErrClosed):
			// No log, or a console retiring: its log is closing.
		case err != nil:
			clog.Error("reopen console log", "error", err)
			failed++
		default:
			reopened++
		}
	}
	if reopened == 0 && failed == 0 {
		log.Info("SIGHUP: there is no console log to reopen")
	} else {
		log.Info("console log reopened", "logs", reopened)
	}
}

func logStats(log hclog.Logger, consoles []*console.Console, named bool, uptime time.Duration) {
	clients := 0
	for _, c := range consoles {
		s := c.Stats()
		clog := log
		if named {
			clog = log.With("console", s.Name)
		}
		clients += len(s.Clients)
		for _, c := range s.Clients {
			clog.Info("client", "client", c.ID, "socket", c.Socket, "pid", c.PID, "uid", c.UID, "gid", c.GID,
				"read_only", c.ReadOnly, "connected_for", time.Since(c.Connected).Round(time.Second),
				"bytes_out", c.BytesOut, "bytes_in", c.BytesIn, "input_discarded", c.InputDiscarded, "dropped", c.Dropped)
		}
		clog.Info("totals", "uptime", uptime.Round(time.Second), "clients", len(s.Clients), "clients_served", s.ClientsServed,
			"upstream_up", s.UpstreamUp, "upstream_connects", s.UpstreamConnects, "upstream_bytes", s.UpstreamBytes,
			"bytes_out", s.BytesOut, "bytes_in", s.BytesIn, "input_discarded", s.InputDiscarded, "dropped", s.Dropped,
			"log_bytes_not_logged", s.LogNotLogged)
	}
	log.Info("process", "uptime", uptime.Round(time.Second), "consoles", len(consoles), "clients", clients,
		"goroutines", runtime.NumGoroutine())
}

// stopSignal ends the group on SIGINT or SIGTERM: a clean stop.
type stopSignal struct{ os.Signal }

func (s stopSignal) Error() string { return "received " + s.String() }

// resolveAccess looks up the names of an allow-uid and allow-gid pair of
// flags; nil lists mean no such rule. Names that do not exist are found on
// the system, so they are runtime failures.
func resolveAccess(uidFlag string, uids []string, gidFlag string, gids []string) (*unixsock.Access, error) {
	if uids == nil && gids == nil {
		return nil, nil
	}
	var a unixsock.Access
	var err error
	if a.UIDs, err = unixsock.LookupUIDs(uids); err != nil {
		return nil, fmt.Errorf("%s: %w", uidFlag, err)
	}
	if a.GIDs, err = unixsock.LookupGIDs(gids); err != nil {
		return nil, fmt.Errorf("%s: %w", gidFlag, err)
	}
	return &a, nil
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
