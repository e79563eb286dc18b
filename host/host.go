// Package host serves every console on a host from one process: it
// discovers consoles from an upstream path pattern as VMs come and go, and
// runs one console.Console for each.
//
// A path that matches the pattern is a console; a match that disappears
// and comes back within RetireAfter is a VM restart (the same console
// reconnects, and its clients stay); one missing for longer, or whose
// client socket's directory is removed, is retired. A console that cannot
// start is logged once with its name and tried again when its directory
// changes (and on a backoff timer); no other console notices. Discovery
// goes through the process's one inotify watcher and looks at one name per
// event, so its cost does not grow with the number of consoles.
package host

import (
	"cmp"
	"context"
	"maps"
	"os"
	"path/filepath"
	"slices"
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

// Timing of looks that no event brings. pollInterval: where a directory
// cannot be watched (permission, the kernel's watch limit), it is looked at
// this often instead. A console that failed to start is tried again after
// retryMin, doubling to retryMax, or at the next change in its directory
// if that comes later: a failure's own traces (its temporary files) must
// not make it retry at once, over and over.
const (
	pollInterval = time.Second
	retryMin     = time.Second
	retryMax     = 30 * time.Second
)

// Config configures a Host. Zero fields mean the documented defaults.
type Config struct {
	Pattern Pattern
	// Console returns the configuration of the console name, whose
	// upstream is at path (the pattern's match), or why it has none.
	// Required.
	Console func(name, path string) (console.Config, error)
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

	// mu guards what the watch callbacks hand to the loop, and consoles.
	mu       sync.Mutex
	consoles map[string]*console.Console // running, by name
	dirty    map[string]bool             // names to look at again; true: its watches ended
	dirtyAll bool                        // look at everything again
	parent   func()                      // cancels the watch on Parent (or the way to it)
	wake     chan struct{}               // one slot: dirty grew

	// Owned by Run's goroutine.
	entries      map[string]*entry
	parentPolled bool // the way to Parent cannot be watched
	ctx          context.Context
	running      sync.WaitGroup
	ended        chan exited
}

// entry is a name the pattern matched: its directory or its upstream
// exists, or its console is still running.
type entry struct {
	name, path   string
	seen         time.Time         // when first seen: --max-consoles' order
	c            *console.Console  // running or retiring; nil otherwise
	retiring     bool              // Retire was called; its Run is ending
	missingSince time.Time         // zero while the match is there
	listenDirs   []string          // its client sockets' directories
	failures     int               // opens failed in a row (the first is logged)
	retryAt      time.Time         // no open before this, after a failure
	overCap      bool              // left alone at MaxConsoles, logged once
	watches      map[string]func() // watched directory -> cancel
	polled       bool              // a watch failed: looked at on the timer
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
		dirty:    make(map[string]bool),
		wake:     make(chan struct{}, 1),
		entries:  make(map[string]*entry),
		ended:    make(chan exited),
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
	slices.SortFunc(cs, func(a, b *console.Console) int { return cmp.Compare(a.Name(), b.Name()) })
	return cs
}

// mark asks the loop to look at name again ("" means everything); gone
// says that one of its watched directories went, and its watches with it.
// It is called from watch callbacks and never blocks.
func (h *Host) mark(name string, gone bool) {
	h.mu.Lock()
	if name == "" {
		h.dirtyAll = true
	} else {
		h.dirty[name] = h.dirty[name] || gone
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
	h.ctx = ctx
	defer func() {
		h.dropParent()
		for _, e := range h.entries {
			e.unwatchAll()
		}
		// The consoles see ctx and stop together; collect them all.
		go func() {
			h.running.Wait()
			close(h.ended)
		}()
		for range h.ended {
		}
	}()

	h.mark("", false)
	var timer *time.Timer
	for {
		h.lookAgain()
		var due <-chan time.Time
		if next, ok := h.nextDeadline(); ok {
			timer = time.NewTimer(time.Until(next))
			due = timer.C
		}
		select {
		case <-ctx.Done():
		case <-h.wake:
		case <-due:
			h.timersDue()
		case x := <-h.ended:
			h.remove(x)
		}
		if timer != nil {
			timer.Stop()
			timer = nil
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

// lookAgain looks at every name the watches marked, oldest entries first
// so that consoles waiting for a slot get one in the order they came.
func (h *Host) lookAgain() {
	h.mu.Lock()
	all, dirty := h.dirtyAll, h.dirty
	h.dirtyAll, h.dirty = false, make(map[string]bool)
	h.mu.Unlock()
	if all {
		if h.parent == nil {
			h.watchParent()
		}
		for _, n := range append(h.scan(), slices.Collect(maps.Keys(h.entries))...) {
			if _, ok := dirty[n]; !ok {
				dirty[n] = false
			}
		}
	}
	names := make([]string, 0, len(dirty))
	for n := range dirty {
		names = append(names, n)
	}
	seen := func(n string) time.Time {
		if e := h.entries[n]; e != nil {
			return e.seen
		}
		return time.Now()
	}
	slices.SortFunc(names, func(a, b string) int {
		return cmp.Or(seen(a).Compare(seen(b)), cmp.Compare(a, b))
	})
	for _, n := range names {
		if e := h.entries[n]; e != nil && dirty[n] {
			e.unwatchAll() // its directory went: watch it again
		}
		h.check(n)
	}
}

// watchParent watches the pattern's parent directory, or the nearest
// existing directory on the way to it while it is missing.
func (h *Host) watchParent() {
	parent := h.cfg.Pattern.Parent
	h.parentPolled = false
	for {
		dir, _ := watch.NearestDir(parent)
		if dir == "" {
			h.parentPolled = true
			return
		}
		cancel, err := h.cfg.Watcher.Watch(dir, func(e watch.Event) {
			switch {
			case e.Gone || e.Overflow || dir != parent:
				// Gone, or a step on the way: watch again from wherever
				// the way now ends.
				h.dropParent() // the watcher calls back without its lock held
				h.mark("", false)
			default:
				if name, ok := h.cfg.Pattern.Match(e.Name); ok {
					h.mark(name, false)
				}
			}
		})
		if err != nil {
			if !h.parentPolled {
				h.log.Warn("cannot watch for consoles; looking every second", "dir", dir, "error", err)
			}
			h.parentPolled = true
			return
		}
		h.mu.Lock()
		h.parent = cancel
		h.mu.Unlock()
		// A directory on the way that appeared before the watch began
		// sends no event: look again, from there.
		if d, _ := watch.NearestDir(parent); d == dir {
			return
		}
		h.dropParent()
	}
}

func (h *Host) dropParent() {
	h.mu.Lock()
	cancel := h.parent
	h.parent = nil
	h.mu.Unlock()
	if cancel != nil {
		cancel()
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

// check brings name's entry up to date with the filesystem: a console is
// opened for a match that is there, a missing match starts its retirement
// clock, and a running console whose client socket directory is gone is
// retired at once.
func (h *Host) check(name string) {
	e := h.entries[name]
	path := h.cfg.Pattern.Path(name)
	present := exists(path)
	// The matched element (a VM's directory) is watched while it exists,
	// socket or not: that is how its socket's appearance is seen.
	element := present || exists(filepath.Join(h.cfg.Pattern.Parent, h.cfg.Pattern.Entry(name)))
	if e == nil {
		if !element {
			return
		}
		e = &entry{name: name, path: path, seen: time.Now()}
		h.entries[name] = e
	}
	if e.retiring {
		return // looked at again once its Run has ended
	}
	if e.c != nil {
		for _, d := range e.listenDirs {
			if !isDir(d) {
				h.log.Info("console retired: its socket directory is gone", "console", name, "dir", d)
				h.retire(e)
				return
			}
		}
	}
	switch {
	case present && e.c != nil:
		if !e.missingSince.IsZero() {
			h.log.Info("console's upstream is back", "console", name, "missing_for", time.Since(e.missingSince).Round(time.Millisecond))
		}
		e.missingSince = time.Time{}
	case present && time.Now().Before(e.retryAt):
		// Failed a moment ago: the timer brings it back.
	case present:
		h.open(e)
	case e.c == nil && !element:
		e.unwatchAll()
		delete(h.entries, name)
		return
	case e.c != nil && e.missingSince.IsZero():
		e.missingSince = time.Now()
	}
	h.rewatch(e)
}

// open opens and runs a console for e, unless MaxConsoles are running or it
// cannot start; either is logged once, and tried again later.
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
	cfg, err := h.cfg.Console(e.name, e.path)
	var c *console.Console
	if err == nil {
		c, err = console.Open(cfg)
	}
	if err != nil {
		e.failures++
		e.retryAt = time.Now().Add(min(retryMin<<(e.failures-1), retryMax))
		if e.failures == 1 {
			h.log.Error("console cannot start; trying again when its directory changes", "console", e.name, "error", err)
		} else {
			h.log.Debug("console still cannot start", "console", e.name, "error", err, "attempts", e.failures)
		}
		return
	}
	e.c, e.failures, e.retryAt, e.overCap = c, 0, time.Time{}, false
	e.listenDirs = nil
	for _, p := range []string{cfg.Listen, cfg.ListenRO} {
		if p != "" && !slices.Contains(e.listenDirs, filepath.Dir(p)) {
			e.listenDirs = append(e.listenDirs, filepath.Dir(p))
		}
	}
	h.mu.Lock()
	h.consoles[e.name] = c
	h.mu.Unlock()
	h.log.Info("console attached", "console", e.name, "upstream", cfg.Upstream.String(), "listen", cfg.Listen)
	h.running.Go(func() {
		// The loop, or after ctx is done Run's deferred collector, always
		// receives.
		h.ended <- exited{e.name, c, c.Run(h.ctx)}
	})
}

// rewatch points e's watches at what it must see: the way to its upstream
// below the pattern's parent (the parent's own watch sees the rest), and
// its client sockets' directories, for their removal. A directory that
// cannot be watched is looked at on the timer instead.
func (h *Host) rewatch(e *entry) {
	var want []string
	if h.cfg.Pattern.Rest != "" {
		top := filepath.Join(h.cfg.Pattern.Parent, h.cfg.Pattern.Entry(e.name))
		if d, _ := watch.NearestDir(filepath.Dir(e.path)); d != "" && strings.HasPrefix(d+"/", top+"/") {
			want = append(want, d)
		}
	}
	for _, d := range e.listenDirs {
		if !slices.Contains(want, d) && isDir(d) {
			want = append(want, d)
		}
	}
	for d, cancel := range e.watches {
		if !slices.Contains(want, d) {
			cancel()
			delete(e.watches, d)
		}
	}
	e.polled = false
	added := false
	for _, d := range want {
		if _, ok := e.watches[d]; ok {
			continue
		}
		name := e.name
		cancel, err := h.cfg.Watcher.Watch(d, func(ev watch.Event) {
			// Hidden entries are the traces of socket creation (its
			// private directories), ours or a failed attempt's.
			if ev.Gone || ev.Overflow || !strings.HasPrefix(ev.Name, ".") {
				h.mark(name, ev.Gone)
			}
		})
		if err != nil {
			e.polled = true
			continue
		}
		if e.watches == nil {
			e.watches = make(map[string]func())
		}
		e.watches[d] = cancel
		added = true
	}
	if added {
		// What changed before the new watches began is seen by looking
		// again.
		h.mark(e.name, false)
	}
}

func (e *entry) unwatchAll() {
	for _, cancel := range e.watches {
		cancel()
	}
	e.watches = nil
}

// nextDeadline returns when the loop must look without an event: the next
// retirement, the next retry of a console that failed, or the next poll.
func (h *Host) nextDeadline() (time.Time, bool) {
	var next time.Time
	at := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	if h.parentPolled {
		at(time.Now().Add(pollInterval))
	}
	for _, e := range h.entries {
		switch {
		case e.retiring:
		case e.c != nil && !e.missingSince.IsZero():
			at(e.missingSince.Add(h.cfg.RetireAfter))
		case e.c == nil && !e.retryAt.IsZero():
			at(e.retryAt)
		}
		if e.polled {
			at(time.Now().Add(pollInterval))
		}
	}
	return next, !next.IsZero()
}

// timersDue retires the consoles whose match has been missing for
// RetireAfter and looks again at those whose time has come.
func (h *Host) timersDue() {
	now := time.Now()
	if h.parentPolled {
		h.mark("", false)
	}
	for _, e := range h.entries {
		switch {
		case e.retiring:
		case e.c != nil && !e.missingSince.IsZero() && !now.Before(e.missingSince.Add(h.cfg.RetireAfter)):
			h.log.Info("console retired: its upstream has been missing", "console", e.name, "for", h.cfg.RetireAfter)
			h.retire(e)
		case e.polled || (e.c == nil && !e.retryAt.IsZero() && !now.Before(e.retryAt)):
			e.retryAt = time.Time{}
			h.mark(e.name, false)
		}
	}
}

func (h *Host) retire(e *entry) {
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
	h.mark(x.name, false)
	for n, e := range h.entries {
		if e.overCap {
			h.mark(n, false)
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
