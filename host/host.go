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
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
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
	// IsOwn, when set, reports whether a path names one of the process's
	// sockets besides the consoles' (the status socket). A match that names
	// one of the proxy's own sockets is never a console: each would proxy
	// the one before.
	IsOwn func(path string) bool
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
	parentPolled bool            // the way to Parent cannot be watched
	nextPoll     time.Time       // when polled directories are looked at next
	watchWarned  bool            // that the way to Parent cannot be watched
	ownWarned    map[string]bool // own sockets the pattern matched, logged once
	ctx          context.Context
	running      sync.WaitGroup
	ended        chan exited
}

// entry is a name the pattern matched: its directory or its upstream
// exists, or its console is still running.
type entry struct {
	name, path   string
	seen         time.Time          // when first seen: --max-consoles' order
	c            *console.Console   // running or retiring; nil otherwise
	retiring     bool               // Retire was called; its Run is ending
	missingSince time.Time          // zero while the match is there
	listenDirs   []dirID            // its client sockets' directories, as opened
	ownNames     []string           // its client sockets' names, for shared directories
	failures     int                // opens failed in a row (the first is logged)
	failedAt     time.Time          // the last failure: changes retry no sooner than retryMin after it
	retryAt      time.Time          // the backoff timer's retry, after a failure
	overCap      bool               // left alone at MaxConsoles, logged once
	watches      map[string]watched // by directory
	polled       bool               // a watch failed: looked at on the timer
}

// dirID identifies a directory: one removed and created again under the
// same name is another. Inotify does not always say that a watched
// directory went (a socket bound in it keeps it alive for the kernel), so
// the identity is compared at every look.
type dirID struct {
	path     string
	dev, ino uint64
}

func statDir(path string) (dirID, bool) {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil || st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		return dirID{path: path}, false
	}
	return dirID{path: path, dev: st.Dev, ino: st.Ino}, true
}

// watched is one of an entry's directory watches.
type watched struct {
	id     dirID
	cancel func()
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
		cfg:       cfg,
		log:       log.Named("host"),
		consoles:  make(map[string]*console.Console),
		dirty:     make(map[string]bool),
		wake:      make(chan struct{}, 1),
		entries:   make(map[string]*entry),
		ended:     make(chan exited),
		ownWarned: make(map[string]bool),
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
		if !h.watchingParent() {
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
	now := time.Now()
	seen := func(n string) time.Time {
		if e := h.entries[n]; e != nil {
			return e.seen
		}
		return now
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
		dir, next := watch.NearestDir(parent)
		if dir == "" {
			h.parentPolled = true
			return
		}
		cancel, err := h.cfg.Watcher.Watch(dir, func(e watch.Event) {
			switch {
			case dir != parent && !e.Gone && !e.Overflow && e.Name != next:
				// Something else in a directory on the way.
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
			if !h.watchWarned {
				h.log.Warn("cannot watch for consoles; looking every second", "dir", dir, "error", err)
				h.watchWarned = true
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

// isOwn reports whether path names one of the proxy's own sockets.
func (h *Host) isOwn(path string) bool {
	if h.cfg.IsOwn != nil && h.cfg.IsOwn(path) {
		return true
	}
	// A copy, in no order: Serves stats, which is not done under mu.
	h.mu.Lock()
	cs := slices.Collect(maps.Values(h.consoles))
	h.mu.Unlock()
	return slices.ContainsFunc(cs, func(c *console.Console) bool { return c.Serves(path) })
}

func (h *Host) watchingParent() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.parent != nil
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
	if present && e == nil && h.isOwn(path) {
		if !h.ownWarned[path] {
			h.log.Warn("a match of the pattern is one of the proxy's own sockets; not a console", "path", path)
			h.ownWarned[path] = true
		}
		return
	}
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
			if now, ok := statDir(d.path); !ok || now != d {
				h.log.Info("console retired: its socket directory is gone", "console", name, "dir", d.path)
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
	case present && e.failures > 0 && time.Since(e.failedAt) < retryMin:
		// Failed a moment ago: its own traces must not make it retry at
		// once; the timer brings it back.
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
		e.failedAt = time.Now()
		e.retryAt = e.failedAt.Add(min(retryMin<<(e.failures-1), retryMax))
		if e.failures == 1 {
			h.log.Error("console cannot start; trying again when its directory changes", "console", e.name, "error", err)
		} else {
			h.log.Debug("console still cannot start", "console", e.name, "error", err, "attempts", e.failures)
		}
		return
	}
	e.c, e.failures, e.retryAt, e.overCap = c, 0, time.Time{}, false
	e.listenDirs, e.ownNames = nil, nil
	for _, p := range []string{cfg.Listen, cfg.ListenRO} {
		if p == "" {
			continue
		}
		e.ownNames = append(e.ownNames, filepath.Base(p))
		if id, ok := statDir(filepath.Dir(p)); ok && !slices.Contains(e.listenDirs, id) {
			e.listenDirs = append(e.listenDirs, id)
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
// its client sockets' directories, for their removal. A directory
// replaced since it was watched is watched anew; one that cannot be
// watched is looked at on the timer instead.
func (h *Host) rewatch(e *entry) {
	// The VM's own directory: any change in it may matter (the socket, or
	// what made the console fail). A shared one (--listen
	// /run/consoles/{name}.sock): only the console's own names, or every
	// console would look at itself for every other's change.
	type want struct {
		id    dirID
		names []string // nil: every name
	}
	var wants []want
	if h.cfg.Pattern.Rest != "" {
		top := filepath.Join(h.cfg.Pattern.Parent, h.cfg.Pattern.Entry(e.name))
		if d, _ := watch.NearestDir(filepath.Dir(e.path)); d != "" && strings.HasPrefix(d+"/", top+"/") {
			if id, ok := statDir(d); ok {
				wants = append(wants, want{id: id})
			}
		}
	}
	for _, d := range e.listenDirs {
		if !slices.ContainsFunc(wants, func(w want) bool { return w.id.path == d.path }) {
			wants = append(wants, want{id: d, names: e.ownNames})
		}
	}
	for d, w := range e.watches {
		if !slices.ContainsFunc(wants, func(x want) bool { return x.id == w.id }) {
			w.cancel()
			delete(e.watches, d)
		}
	}
	e.polled = false
	added := false
	for _, w := range wants {
		if _, ok := e.watches[w.id.path]; ok {
			continue
		}
		name, names := e.name, w.names
		cancel, err := h.cfg.Watcher.Watch(w.id.path, func(ev watch.Event) {
			switch {
			case ev.Gone || ev.Overflow:
				h.mark(name, ev.Gone)
			case strings.HasPrefix(ev.Name, "."):
				// The traces of socket creation (its private
				// directories), ours or a failed attempt's.
			case names == nil || slices.Contains(names, ev.Name):
				h.mark(name, false)
			}
		})
		if err != nil {
			e.polled = true
			continue
		}
		if e.watches == nil {
			e.watches = make(map[string]watched)
		}
		e.watches[w.id.path] = watched{id: w.id, cancel: cancel}
		added = true
	}
	if added {
		// What changed before the new watches began is seen by looking
		// again.
		h.mark(e.name, false)
	}
}

func (e *entry) unwatchAll() {
	for _, w := range e.watches {
		w.cancel()
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
	polling := h.parentPolled
	for _, e := range h.entries {
		polling = polling || e.polled
	}
	if polling {
		// Absolute, so that a stream of events cannot postpone it.
		if h.nextPoll.IsZero() {
			h.nextPoll = time.Now().Add(pollInterval)
		}
		at(h.nextPoll)
	} else {
		h.nextPoll = time.Time{}
	}
	for _, e := range h.entries {
		switch {
		case e.retiring:
		case e.c != nil && !e.missingSince.IsZero():
			at(e.missingSince.Add(h.cfg.RetireAfter))
		case e.c == nil && !e.retryAt.IsZero():
			at(e.retryAt)
		}
	}
	return next, !next.IsZero()
}

// timersDue retires the consoles whose match has been missing for
// RetireAfter and looks again at those whose time has come.
func (h *Host) timersDue() {
	now := time.Now()
	poll := !h.nextPoll.IsZero() && !now.Before(h.nextPoll)
	if poll {
		h.nextPoll = time.Time{}
		if h.parentPolled {
			h.mark("", false)
		}
	}
	for _, e := range h.entries {
		switch {
		case e.retiring:
		case e.c != nil && !e.missingSince.IsZero() && !now.Before(e.missingSince.Add(h.cfg.RetireAfter)):
			h.log.Info("console retired: its upstream has been missing", "console", e.name, "for", h.cfg.RetireAfter)
			h.retire(e)
		case e.c == nil && !e.retryAt.IsZero() && !now.Before(e.retryAt):
			e.retryAt = time.Time{}
			e.failedAt = time.Time{} // the timer's retry is due
			h.mark(e.name, false)
		case poll && e.polled:
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

// exists reports whether path is there, as far as the proxy can tell: a
// path it may not look at is there too, so that its console is tried and
// the permission failure logged with its name, not silently ignored.
func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil || errors.Is(err, os.ErrPermission)
}
