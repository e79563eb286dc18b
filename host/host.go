// Package host serves every console on a host from one process: it
// discovers consoles from an upstream path pattern as VMs come and go, and
// runs one console.Console for each.
//
// A path that matches the pattern is a console; a match that disappears
// and comes back within RetireAfter is a VM restart (the same console
// reconnects, and its clients stay); one missing for longer, or whose
// client socket's directory is removed, is retired. A console that cannot
// start is logged with its name and tried again when its directory
// changes; no other console notices. Discovery goes through the process's
// one inotify watcher, so its cost does not grow with the number of
// consoles; it scans one name per event, not the whole pattern.
package host

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/consoleproxy/consoleproxy/console"
	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
)

// Defaults for the zero fields of Config.
const (
	DefaultMaxConsoles = 1024
	DefaultRetireAfter = 30 * time.Second
)

// rescanInterval is how often the pattern is scanned afresh where inotify
// cannot be had: the only case with a timer while nothing happens.
const rescanInterval = time.Second

// Config configures a Host. Zero fields mean the documented defaults.
type Config struct {
	Pattern Pattern
	// Console returns the configuration of the console name, whose
	// upstream is at path (the pattern's match). Required.
	Console func(name, path string) console.Config
	// MaxConsoles bounds the consoles served at once, first come first
	// served. Zero means DefaultMaxConsoles.
	MaxConsoles int
	// RetireAfter is how long a match may be missing before its console is
	// retired. Zero means DefaultRetireAfter.
	RetireAfter time.Duration
	// Watcher is the process's shared inotify watcher. Required.
	Watcher *watch.Watcher
	// Logger receives discovery's diagnostics; each console's lines carry
	// console=NAME. Nil means none.
	Logger hclog.Logger
}

// Host discovers and runs consoles. Create it with New and call Run once;
// Consoles may be called at any time.
type Host struct {
	cfg Config
	log hclog.Logger

	// mu guards consoles and what the watch callbacks hand to the loop.
	mu       sync.Mutex
	consoles map[string]*console.Console // running, by name
	dirty    map[string]struct{}         // names to look at again
	dirtyAll bool                        // look at everything again
	wake     chan struct{}               // one slot: dirty grew

	parent func() // cancels the watch on Parent (or the way to it); guarded by mu

	entries map[string]*entry // owned by Run's goroutine
}

// entry is a name the pattern matched, running or not.
type entry struct {
	name, path   string
	c            *console.Console // nil while not running
	run          bool             // c's Run was started
	retiring     bool             // Retire was called; its Run is ending
	missingSince time.Time        // zero while the match is there
	startErr     string           // the last failure to start, logged once
	overCap      bool             // left alone at MaxConsoles, logged once
	unwatch      []func()         // its directory watches
	watched      []string         // and what they watch
	listenDirs   []string         // its client sockets' directories
}

// New returns a Host for cfg; it starts nothing.
func New(cfg Config) *Host {
	if cfg.MaxConsoles == 0 {
		cfg.MaxConsoles = DefaultMaxConsoles
	}
	if cfg.RetireAfter == 0 {
		cfg.RetireAfter = DefaultRetireAfter
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Host{
		cfg:      cfg,
		log:      log.Named("host"),
		consoles: make(map[string]*console.Console),
		dirty:    make(map[string]struct{}),
		wake:     make(chan struct{}, 1),
		entries:  make(map[string]*entry),
	}
}

// Consoles returns the running consoles, sorted by name.
func (h *Host) Consoles() []*console.Console {
	h.mu.Lock()
	cs := make([]*console.Console, 0, len(h.consoles))
	for _, c := range h.consoles {
		cs = append(cs, c)
	}
	h.mu.Unlock()
	sort.Slice(cs, func(i, j int) bool { return cs[i].Name() < cs[j].Name() })
	return cs
}

// mark asks the loop to look at name again; "" means everything. It is
// called from watch callbacks and never blocks.
func (h *Host) mark(name string) {
	h.mu.Lock()
	if name == "" {
		h.dirtyAll = true
	} else {
		h.dirty[name] = struct{}{}
	}
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// exited carries a console whose Run returned.
type exited struct {
	name string
	c    *console.Console
	err  error
}

// Run discovers and serves consoles until ctx is done; then every console
// stops at once (each within its own budgets) and Run returns once all
// have. It returns nil.
func (h *Host) Run(ctx context.Context) error {
	var running sync.WaitGroup
	ended := make(chan exited)
	defer func() {
		h.dropParent()
		for _, e := range h.entries {
			e.unwatchAll()
		}
		// The consoles see ctx and stop together; collect them all.
		go func() {
			running.Wait()
			close(ended)
		}()
		for range ended {
		}
	}()
	start := func(e *entry) {
		c := e.c
		running.Go(func() {
			// The loop, or after ctx is done the deferred collector,
			// always receives.
			ended <- exited{e.name, c, c.Run(ctx)}
		})
	}

	h.watchParent()
	h.mark("")
	var retire *time.Timer
	var retireC <-chan time.Time
	for {
		// Look at what changed.
		h.mu.Lock()
		all, names := h.dirtyAll, h.dirty
		h.dirtyAll, h.dirty = false, make(map[string]struct{})
		h.mu.Unlock()
		if all {
			if !h.watchingParent() {
				h.watchParent()
			}
			for _, n := range h.scan() {
				names[n] = struct{}{}
			}
			for n := range h.entries {
				names[n] = struct{}{}
			}
		}
		for _, n := range sortedNames(names) {
			if e := h.check(n); e != nil && e.c != nil && !e.run {
				e.run = true
				start(e)
			}
		}
		// Arm the earliest retirement.
		if retire != nil {
			retire.Stop()
			retire, retireC = nil, nil
		}
		if next, ok := h.nextRetirement(); ok {
			retire = time.NewTimer(time.Until(next))
			retireC = retire.C
		}
		var rescan <-chan time.Time
		if !h.watchingParent() {
			rescan = time.After(rescanInterval) // no inotify here
		}
		select {
		case <-ctx.Done():
			if retire != nil {
				retire.Stop()
			}
			return nil
		case <-h.wake:
		case <-retireC:
			retire = nil
			h.retireDue()
		case <-rescan:
			h.mark("")
		case x := <-ended:
			h.remove(x)
		}
	}
}

func sortedNames(m map[string]struct{}) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// watchParent watches the pattern's parent directory, or the nearest
// existing directory on the way to it while it is missing.
func (h *Host) watchParent() {
	parent := h.cfg.Pattern.Parent
	dir := nearestExisting(parent)
	if dir == "" {
		return
	}
	cancel, err := h.cfg.Watcher.Watch(dir, func(e watch.Event) {
		switch {
		case e.Gone || e.Overflow:
			h.dropParent()
			h.mark("")
		case dir != parent:
			h.dropParent() // a step closer: watch again from there
			h.mark("")
		default:
			if name, ok := h.cfg.Pattern.Match(e.Name); ok {
				h.mark(name)
			}
		}
	})
	if err != nil {
		h.log.Warn("cannot watch for consoles; scanning every second", "dir", dir, "error", err)
		return
	}
	h.mu.Lock()
	h.parent = cancel
	h.mu.Unlock()
}

func (h *Host) watchingParent() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.parent != nil
}

// dropParent forgets the parent's watch, from a callback; the loop
// watches again when it looks at everything.
func (h *Host) dropParent() {
	h.mu.Lock()
	cancel := h.parent
	h.parent = nil
	h.mu.Unlock()
	if cancel != nil {
		cancel() // the watcher calls back without its lock held
	}
}

// scan lists the names the pattern matches now.
func (h *Host) scan() []string {
	entries, err := os.ReadDir(h.cfg.Pattern.Parent)
	if err != nil {
		return nil
	}
	var names []string
	for _, de := range entries {
		if name, ok := h.cfg.Pattern.Match(de.Name()); ok {
			names = append(names, name)
		}
	}
	return names
}

// check brings name's entry up to date with the filesystem and returns it
// (nil when there is none): a console is opened for a match that is there,
// a missing match starts its retirement clock, and a running console whose
// client socket directory is gone is retired at once.
func (h *Host) check(name string) *entry {
	e := h.entries[name]
	path := h.cfg.Pattern.Path(name)
	present := exists(path)
	if e == nil {
		if !present && !h.awaited(name) {
			return nil
		}
		e = &entry{name: name, path: path}
		h.entries[name] = e
		if !present {
			h.log.Debug("waiting for the console's upstream to appear", "console", name, "path", path)
		}
	}
	if e.retiring {
		return e // looked at again once its Run has ended
	}
	h.rewatch(e)
	if e.c != nil {
		for _, d := range e.listenDirs {
			if !isDir(d) {
				h.log.Info("console retired: its socket directory is gone", "console", name, "dir", d)
				h.retireEntry(e)
				return e
			}
		}
	}
	switch {
	case present && e.c != nil:
		if !e.missingSince.IsZero() {
			h.log.Info("console's upstream is back", "console", name, "missing_for", time.Since(e.missingSince).Round(time.Millisecond))
		}
		e.missingSince = time.Time{}
	case present:
		h.open(e)
	case e.c == nil && h.awaited(name):
		// Its directory is there and its socket is not yet: rewatch
		// watches the way to it.
	case e.c == nil:
		e.unwatchAll()
		delete(h.entries, name)
	case e.missingSince.IsZero():
		e.missingSince = time.Now()
	}
	return e
}

// awaited reports whether name's upstream is waited for without a console:
// the pattern's "*" names a directory (/run/vms/*/serial.sock), it exists,
// and the socket is not yet in it. A VM's directory comes first and its
// VMM creates the socket later; only a watch inside the directory sees it.
func (h *Host) awaited(name string) bool {
	return h.cfg.Pattern.Rest != "" && isDir(filepath.Join(h.cfg.Pattern.Parent, h.cfg.Pattern.Entry(name)))
}

// open starts a console for e, unless MaxConsoles are running or it cannot
// start; either is logged once, and tried again at the next look.
func (h *Host) open(e *entry) {
	h.mu.Lock()
	n := len(h.consoles)
	h.mu.Unlock()
	if n >= h.cfg.MaxConsoles {
		if !e.overCap {
			h.log.Warn("too many consoles; leaving this one alone until one retires", "console", e.name, "max_consoles", h.cfg.MaxConsoles)
			e.overCap = true
		}
		return
	}
	cfg := h.cfg.Console(e.name, e.path)
	c, err := console.Open(cfg)
	if err != nil {
		if msg := err.Error(); msg != e.startErr {
			h.log.Error("console cannot start; trying again when its directory changes", "console", e.name, "error", err)
			e.startErr = msg
		}
		return
	}
	e.c, e.startErr, e.overCap = c, "", false
	e.listenDirs = nil
	for _, p := range []string{cfg.Listen, cfg.ListenRO} {
		if p != "" && !slices.Contains(e.listenDirs, filepath.Dir(p)) {
			e.listenDirs = append(e.listenDirs, filepath.Dir(p))
		}
	}
	h.rewatch(e)
	h.mu.Lock()
	h.consoles[e.name] = c
	h.mu.Unlock()
	h.log.Info("console attached", "console", e.name, "upstream", cfg.Upstream.String(), "listen", cfg.Listen)
}

// rewatch points e's watches at what it must see: the way to its
// upstream below the pattern's parent, and its client sockets'
// directories (for their removal).
func (h *Host) rewatch(e *entry) {
	var want []string
	if h.cfg.Pattern.Rest != "" {
		top := filepath.Join(h.cfg.Pattern.Parent, h.cfg.Pattern.Entry(e.name))
		if d := nearestExisting(filepath.Dir(e.path)); d != "" && strings.HasPrefix(d+"/", top+"/") {
			want = append(want, d)
		}
	}
	for _, d := range e.listenDirs {
		if !slices.Contains(want, d) && isDir(d) {
			want = append(want, d)
		}
	}
	if slices.Equal(e.watched, want) {
		return
	}
	e.unwatchAll()
	for _, d := range want {
		name := e.name
		cancel, err := h.cfg.Watcher.Watch(d, func(watch.Event) { h.mark(name) })
		if err != nil {
			continue // looked at again at the next event
		}
		e.unwatch = append(e.unwatch, cancel)
		e.watched = append(e.watched, d)
	}
	// What changed before the watches began is not reported: look again.
	h.mark(e.name)
}

func (e *entry) unwatchAll() {
	for _, c := range e.unwatch {
		c()
	}
	e.unwatch, e.watched = nil, nil
}

// nextRetirement returns when the next missing match is due to retire.
func (h *Host) nextRetirement() (time.Time, bool) {
	var next time.Time
	for _, e := range h.entries {
		if e.c == nil || e.retiring || e.missingSince.IsZero() {
			continue
		}
		if due := e.missingSince.Add(h.cfg.RetireAfter); next.IsZero() || due.Before(next) {
			next = due
		}
	}
	return next, !next.IsZero()
}

// retireDue retires every console whose match has been missing for
// RetireAfter.
func (h *Host) retireDue() {
	now := time.Now()
	for _, e := range h.entries {
		if e.c != nil && !e.retiring && !e.missingSince.IsZero() && !now.Before(e.missingSince.Add(h.cfg.RetireAfter)) {
			h.log.Info("console retired: its upstream has been missing", "console", e.name, "for", h.cfg.RetireAfter)
			h.retireEntry(e)
		}
	}
}

func (h *Host) retireEntry(e *entry) {
	e.retiring = true
	e.unwatchAll()
	e.c.Retire()
}

// remove forgets a console whose Run has returned (retired, or failed),
// and looks again at its name and at those left alone for capacity.
func (h *Host) remove(x exited) {
	if x.err != nil {
		h.log.Error("console stopped", "console", x.name, "error", x.err)
	}
	h.mu.Lock()
	if h.consoles[x.name] == x.c {
		delete(h.consoles, x.name)
	}
	h.mu.Unlock()
	if e := h.entries[x.name]; e != nil && e.c == x.c {
		e.unwatchAll()
		delete(h.entries, x.name)
	}
	h.mark(x.name)
	for n, e := range h.entries {
		if e.overCap {
			h.mark(n)
		}
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// nearestExisting returns path if it is a directory, else the deepest
// existing directory on the way to it; "" when none can be seen.
func nearestExisting(path string) string {
	for d := filepath.Clean(path); ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err == nil && fi.IsDir() {
			return d
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, os.ErrPermission) && !isNotDir(err) {
			return ""
		}
		if filepath.Dir(d) == d {
			return ""
		}
	}
}

func isNotDir(err error) bool {
	var pe *os.PathError
	return errors.As(err, &pe) && strings.Contains(pe.Err.Error(), "not a directory")
}
