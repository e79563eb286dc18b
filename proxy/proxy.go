// Package proxy re-exports a virtual machine's single-client serial console
// to many readers at once.
//
// A Proxy owns one upstream (the VMM's console socket, a PTY, or a socket the
// VMM dials) and drains it continuously into one shared ring of the most
// recent output. Every reader, whether a client of a Unix socket served by
// Serve, the console log writer, or an in-process Reader, walks that ring
// with its own cursor: it first receives what the ring holds (the replay) and
// then live output, as one walk, so the seam has no gap and no duplicate.
//
// Reading the upstream never waits for a reader. A reader slower than the VMM
// falls behind on its own; once it is more than a whole ring behind it is
// told exactly how many bytes it missed (or is disconnected, per
// SlowClientPolicy). This is deliberate: a serial console that stalls the
// guest because a viewer stopped reading is worse than one that drops bytes
// for that viewer.
//
// Input from read-write clients is written to the upstream one read at a
// time, whole and untranslated, by one writer per upstream connection, so a
// VMM that stops reading delays input and nothing else. Input that arrives
// while the upstream is down, or while a VMM that does not read has a full
// queue, is discarded and counted.
//
// As a library, a program runs a console proxy in-process: New, then
// RunUpstream in a goroutine; then any of Serve (a Unix socket for socat and
// nc, created with Listen), NewReader (replay and live output, in-process),
// WriteInput (type into the VM) and RunLog (a console log); and to stop,
// cancel RunUpstream's context and call Shutdown. See Example.
//
// The package is the only one in consoleproxy with sockets and goroutines;
// every goroutine it starts ends when Shutdown or Close returns, or when the
// context given to RunUpstream or RunLog is done.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/consoleproxy/consoleproxy/ringbuf"
	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/warnlimit"
	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
)

// Defaults for the zero fields of Config.
const (
	DefaultBufferSize = 1 << 20
	DefaultMaxClients = 64
)

// Bounds on Config.BufferSize.
const (
	MinBufferSize = 4 << 10
	MaxBufferSize = 1 << 30
)

// Errors returned by this package.
var (
	// ErrClosed is returned by Serve after Shutdown or Close, and by a
	// Reader's Read after the Reader or its Proxy was closed.
	ErrClosed = errors.New("proxy closed")
	// ErrTooSlow ends a reader under SlowClientDisconnect that fell more
	// than a whole ring behind.
	ErrTooSlow = errors.New("reader fell more than the ring behind")
)

// ReplaySize says how much history a new reader receives before live output.
type ReplaySize int64

const (
	// ReplayAll replays everything the ring holds. It is the zero value.
	ReplayAll ReplaySize = 0
	// ReplayNone starts every reader at live output.
	ReplayNone ReplaySize = -1
)

// SlowClientPolicy says what happens to a reader that falls more than a
// whole ring behind.
type SlowClientPolicy int

const (
	// SlowClientSkip tells the reader how many bytes it missed and resumes
	// it at the oldest retained line. It is the zero value.
	SlowClientSkip SlowClientPolicy = iota
	// SlowClientDisconnect ends the reader without a notice.
	SlowClientDisconnect
)

// Config configures a Proxy. Zero fields mean the documented defaults.
type Config struct {
	// Upstream is where console output comes from and input goes to.
	// Required.
	Upstream Upstream
	// BufferSize is the ring's size in bytes, MinBufferSize to
	// MaxBufferSize. Zero means DefaultBufferSize.
	BufferSize int
	// Replay limits what a new reader receives before live output.
	Replay ReplaySize
	// SlowClient is the policy for readers that fall a ring behind.
	SlowClient SlowClientPolicy
	// MaxClients bounds the socket clients across all served listeners.
	// Zero means DefaultMaxClients.
	MaxClients int
	// Access, when not nil, limits who may connect to served sockets.
	Access *unixsock.Access
	// ReadOnlyAccess, when not nil, limits who may connect to sockets
	// served with ServeReadOnly instead of Access. It cannot widen Access
	// for the read-write sockets.
	ReadOnlyAccess *unixsock.Access
	// DisableNotices keeps the upstream and drop notices out of the stream.
	// Refusal notices are always sent.
	DisableNotices bool
	// ExitWithUpstream makes RunUpstream return nil once the first upstream
	// connection ends, instead of reconnecting.
	ExitWithUpstream bool
	// Seed is history placed in the ring before any upstream output, such
	// as the tail of a console log from before a restart. It should begin
	// at a line start. A non-empty Seed is followed by the restarted notice.
	Seed []byte
	// OwnSockets are the sockets the caller is about to Serve. RunUpstream
	// never connects to any socket the proxy serves, these included from
	// the start, before Serve runs: the proxy would read its own output.
	OwnSockets []*unixsock.SocketListener
	// Watcher is the process's shared inotify watcher, through which
	// RunUpstream waits for a missing upstream path. Nil means a private
	// one.
	Watcher *watch.Watcher
	// Logger receives the proxy's own diagnostics. Nil means none.
	Logger hclog.Logger
}

// Proxy fans one upstream console out to many readers. Create it with New,
// run RunUpstream, serve listeners with Serve, and stop it with Shutdown or
// Close. All methods are safe for concurrent use.
type Proxy struct {
	cfg       Config
	log       hclog.Logger
	clientLog hclog.Logger
	upLog     hclog.Logger

	// Repeated warnings, rate-limited: a peer connecting in a loop must
	// not flood the daemon log.
	deniedWarn, fullWarn *warnlimit.Limiter

	// mu guards the ring and every Reader's cursor and state, plus the
	// fields below it. It is held only for memory copies, never for I/O.
	mu        sync.Mutex
	ring      *ringbuf.Ring
	parked    []*Reader // readers waiting for the ring to grow
	draining  bool      // Shutdown began: readers end once caught up
	closed    bool      // no new clients or readers
	clients   map[*client]struct{}
	readers   map[*Reader]struct{} // from NewReader, for Close to end
	listeners map[net.Listener]struct{}
	nextID    uint64
	logReader *Reader // the console log writer's cursor; see RunLog

	// Wake coalescing; see appendOutput.
	lastWake    time.Time
	pendingWake int         // bytes appended since the last wake
	wakeTimer   *time.Timer // armed while a wake is deferred
	wakeArmed   bool
	// typist is the reader of the client whose input was queued last, or
	// nil. queueInput sets it without mu; the reader's state is still
	// guarded by mu. A reader clears it when it closes, so that a client
	// that left is not kept; a store racing with that close can leave a
	// closed reader here, which is never parked and so never woken.
	typist atomic.Pointer[Reader]

	// Counters for Stats. totals holds the finished clients' figures.
	totals           Stats
	upstreamBytes    uint64
	upstreamConnects uint64
	logNotLogged     atomic.Uint64 // console bytes the log writer lost

	// inputMu guards the input on its way to the upstream (see input.go).
	// It is never held across a write: one goroutine per connection writes
	// the queued chunks, so a VMM that does not read holds up no one else.
	inputMu       sync.Mutex
	upstream      io.Writer     // nil while the upstream is down
	inputQueue    []inputChunk  // oldest first
	inputQueued   int           // bytes in inputQueue
	inputWake     chan struct{} // one slot: inputQueue grew
	inputStop     chan struct{} // closed when the connection ends
	inputWriter   sync.WaitGroup
	inputFull     bool   // the queue overflowed; logged once
	discardedFull uint64 // input discarded since the queue overflowed
	discardedDown uint64 // input discarded since the upstream was last up

	clientsDone sync.WaitGroup
}

// New validates cfg and returns a Proxy whose ring holds cfg.Seed. It starts
// nothing; the caller runs RunUpstream and Serve.
func New(cfg Config) (*Proxy, error) {
	if cfg.Upstream == nil {
		return nil, errors.New("no upstream configured")
	}
	if cfg.BufferSize == 0 {
		cfg.BufferSize = DefaultBufferSize
	}
	if cfg.BufferSize < MinBufferSize || cfg.BufferSize > MaxBufferSize {
		return nil, fmt.Errorf("buffer size %d is outside %d to %d bytes", cfg.BufferSize, MinBufferSize, MaxBufferSize)
	}
	if cfg.MaxClients == 0 {
		cfg.MaxClients = DefaultMaxClients
	}
	if cfg.MaxClients < 0 {
		return nil, fmt.Errorf("max clients %d is negative", cfg.MaxClients)
	}
	if cfg.Replay < ReplayNone {
		return nil, fmt.Errorf("replay size %d is invalid", cfg.Replay)
	}
	if cfg.SlowClient != SlowClientSkip && cfg.SlowClient != SlowClientDisconnect {
		return nil, fmt.Errorf("unknown slow client policy %d", cfg.SlowClient)
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	p := &Proxy{
		cfg:       cfg,
		log:       log,
		clientLog: log.Named("client"),
		upLog:     log.Named("upstream").With("upstream", cfg.Upstream.String()),
		inputWake: make(chan struct{}, 1),
		ring:      ringbuf.New(cfg.BufferSize),
		clients:   make(map[*client]struct{}),
		readers:   make(map[*Reader]struct{}),
		listeners: make(map[net.Listener]struct{}),
	}
	p.deniedWarn = warnlimit.New(p.clientLog, "client refused: access denied")
	p.fullWarn = warnlimit.New(p.clientLog, "client refused: too many clients")
	p.ring.Write(cfg.Seed)
	// The log writer starts after the seed, which came from the log, and
	// before the restarted notice, which marks the restart in the log too.
	p.logReader = p.newReader(p.ring.End(), false, SlowClientSkip)
	if len(cfg.Seed) > 0 && !cfg.DisableNotices {
		p.ring.Write(notice(noticeRestarted, p.atLineStartLocked()))
	}
	return p, nil
}

// Wake coalescing. Waking every parked client for every small upstream
// read costs a wake-up and a write per client per read; while output
// flows, waking them at most once per coalesceWindow gives each client
// fewer, larger writes. Output after a quiet spell wakes everyone at once,
// and so does a backlog of coalesceBytes, so a flood is never held back.
//
// The window must never delay output that someone is waiting for: the
// echo of a keystroke, or the prompt a script waits for after each
// command, which in a request/response loop comes less than a window after
// the output before it. So the typist, the client whose input went to the
// VMM last, is not coalesced: whenever its writer is idle, every read wakes
// it at once, and a busy writer takes everything that came meanwhile in
// its next write. It is also woken first when everyone is, so that with
// many clients its echo does not wait behind the others' writes. That
// costs one client's worth of wake-ups, and nothing while nobody types.
const (
	coalesceWindow = time.Millisecond
	coalesceBytes  = 64 << 10
)

// appendOutput adds upstream output to the ring and wakes parked readers:
// the typist at once, the others at once or within coalesceWindow. It
// never blocks on a reader: it holds mu only for the copy.
func (p *Proxy) appendOutput(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.upstreamBytes += uint64(len(b))
	p.ring.Write(b)
	p.pendingWake += len(b)
	p.wakeTypistLocked()
	if p.wakeArmed {
		return // the timer wakes everyone else
	}
	now := time.Now()
	since := now.Sub(p.lastWake)
	if since >= coalesceWindow || p.pendingWake >= coalesceBytes || len(p.parked) == 0 {
		p.wakeNowLocked(now)
		return
	}
	p.wakeArmed = true
	if p.wakeTimer == nil {
		p.wakeTimer = time.AfterFunc(coalesceWindow-since, p.deferredWake)
	} else {
		p.wakeTimer.Reset(coalesceWindow - since)
	}
}

func (p *Proxy) deferredWake() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.wakeArmed {
		p.wakeArmed = false
		p.wakeNowLocked(time.Now())
	}
}

// stopWakeTimerLocked cancels a deferred wake-up; the caller wakes or
// closes the readers itself.
func (p *Proxy) stopWakeTimerLocked() {
	if p.wakeTimer != nil {
		p.wakeTimer.Stop()
	}
	p.wakeArmed = false
}

func (p *Proxy) wakeNowLocked(now time.Time) {
	p.wakeLocked()
	p.lastWake = now
	p.pendingWake = 0
}

// appendNotice adds a stream notice to the ring, unless notices are off.
func (p *Proxy) appendNotice(text string) {
	if p.cfg.DisableNotices {
		return
	}
	p.announce(text)
}

// Retire tells every reader that the console is going away for good (host
// mode retires a console whose VM is gone), whatever DisableNotices says:
// a client must be able to tell a retired console from a restarting VM.
// Call it after the upstream has stopped and before Shutdown.
func (p *Proxy) Retire() { p.announce(noticeRetired) }

// announce adds a notice to the ring and wakes every reader at once.
func (p *Proxy) announce(text string) {
	p.mu.Lock()
	p.ring.Write(notice(text, p.atLineStartLocked()))
	p.stopWakeTimerLocked()
	p.wakeNowLocked(time.Now())
	p.mu.Unlock()
}

// atLineStartLocked reports whether the ring's stream ends at a line start.
func (p *Proxy) atLineStartLocked() bool {
	end := p.ring.End()
	if end == 0 {
		return true
	}
	b, _ := p.ring.ByteAt(end - 1)
	return b == '\n'
}

// wakeLocked wakes every parked reader once, the typist first. Each reader
// has a one-slot channel, so a wake-up never blocks and repeated wake-ups
// coalesce.
func (p *Proxy) wakeLocked() {
	p.wakeTypistLocked()
	for i, r := range p.parked {
		r.parked = false
		r.signal()
		p.parked[i] = nil
	}
	p.parked = p.parked[:0]
}

// wakeTypistLocked wakes the typist if it is parked.
func (p *Proxy) wakeTypistLocked() {
	if t := p.typist.Load(); t != nil && t.parked {
		p.unparkLocked(t)
		t.signal()
	}
}

// Shutdown stops accepting clients, lets every reader receive what the ring
// holds for it, and closes them, all within ctx: once ctx is done, the
// remaining clients are closed at once. Stop the upstream first (cancel
// RunUpstream's context) so that the ring stops growing. Shutdown returns
// after every client goroutine has ended; it returns ctx's error when it had
// to cut clients off. It is safe to call more than once.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closed = true
	p.draining = true
	lns := p.takeListenersLocked()
	p.stopWakeTimerLocked()
	p.wakeNowLocked(time.Now())
	p.mu.Unlock()
	err := closeAll(lns)

	done := make(chan struct{})
	go func() {
		p.clientsDone.Wait()
		close(done)
	}()
	defer p.stopWarnings()
	select {
	case <-done:
		return err
	case <-ctx.Done():
		p.closeClients()
		<-done
		return errors.Join(err, ctx.Err())
	}
}

// Close stops accepting clients and closes every client and Reader at once,
// without draining. It returns after every client goroutine has ended and is
// safe to call more than once.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	lns := p.takeListenersLocked()
	p.stopWakeTimerLocked()
	readers := slices.Collect(maps.Keys(p.readers))
	p.mu.Unlock()
	err := closeAll(lns)
	p.closeClients()
	for _, r := range readers {
		r.Close()
	}
	p.logReader.Close()
	p.clientsDone.Wait()
	p.stopWarnings()
	return err
}

// stopWarnings logs what the rate-limited warnings held back and disarms
// their timers.
func (p *Proxy) stopWarnings() {
	p.deniedWarn.Stop()
	p.fullWarn.Stop()
}

func (p *Proxy) takeListenersLocked() []net.Listener {
	lns := make([]net.Listener, 0, len(p.listeners))
	for ln := range p.listeners {
		lns = append(lns, ln)
		delete(p.listeners, ln)
	}
	return lns
}

func closeAll(lns []net.Listener) error {
	var errs []error
	for _, ln := range lns {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (p *Proxy) closeClients() {
	p.mu.Lock()
	cs := make([]*client, 0, len(p.clients))
	for c := range p.clients {
		cs = append(cs, c)
	}
	p.mu.Unlock()
	for _, c := range cs {
		c.close()
	}
}
