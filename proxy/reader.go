package proxy

import (
	"io"
	"sync"
)

// Reader walks the proxy's output with its own cursor: first the replay,
// then live output, with no gap and no duplicate between them. Reads never
// consume: every Reader sees every byte, unless it falls more than a whole
// ring behind. A Reader is used by one goroutine at a time; Close may be
// called from any goroutine.
type Reader struct {
	p        *Proxy
	wake     chan struct{} // one slot: a pending wake-up
	done     chan struct{} // closed by Close
	doneOnce sync.Once

	// Guarded by p.mu.
	cursor   uint64 // absolute offset of the next byte to deliver
	pending  []byte // a notice not yet delivered
	last     byte   // the last byte delivered, for notice framing
	parked   bool   // in p.parked, at parkedAt
	parkedAt int
	closed   bool
	dropped  uint64 // bytes skipped because the reader fell behind

	// dropNotice, when set, reports skipped bytes in the stream.
	dropNotice bool
	slow       SlowClientPolicy
}

// newReader returns a reader whose walk begins at cursor. The stream it
// receives starts at a line start, as far as notice framing is concerned.
func (p *Proxy) newReader(cursor uint64, dropNotice bool, slow SlowClientPolicy) *Reader {
	return &Reader{
		p:          p,
		wake:       make(chan struct{}, 1),
		done:       make(chan struct{}),
		cursor:     cursor,
		last:       '\n',
		dropNotice: dropNotice,
		slow:       slow,
	}
}

// replayStartLocked is where a new reader's walk begins: the oldest byte the
// replay policy allows, moved to a line start when that is not the first
// byte of the history.
func (p *Proxy) replayStartLocked() uint64 {
	start, end := p.ring.Start(), p.ring.End()
	switch replay := p.cfg.Replay; {
	case replay == ReplayNone:
		return end
	case replay > 0 && uint64(replay) < end-start:
		start = end - uint64(replay)
	}
	return p.ring.LineStart(start)
}

// NewReader returns a Reader that receives the replay and then live output,
// like a client of a served socket, under the proxy's replay, notice and
// slow-client settings. It does not count against MaxClients. Close it when
// done. It returns ErrClosed after Shutdown or Close.
func (p *Proxy) NewReader() (*Reader, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrClosed
	}
	r := p.newReader(p.replayStartLocked(), !p.cfg.DisableNotices, p.cfg.SlowClient)
	p.readers[r] = struct{}{} // Close ends it
	return r, nil
}

// Read blocks until output is available and copies it into b. It returns
// io.EOF once the proxy is shutting down and the reader has received
// everything, ErrClosed after Close, and ErrTooSlow when the reader fell a
// ring behind under SlowClientDisconnect.
func (r *Reader) Read(b []byte) (int, error) {
	r.p.mu.Lock()
	defer r.p.mu.Unlock()
	if err := r.waitLocked(); err != nil {
		return 0, err
	}
	return r.readLocked(b)
}

// Dropped returns how many bytes the reader has skipped so far because it
// fell behind.
func (r *Reader) Dropped() uint64 {
	r.p.mu.Lock()
	defer r.p.mu.Unlock()
	return r.dropped
}

// Close ends the reader; a Read blocked in another goroutine returns
// ErrClosed. It is safe to call more than once.
func (r *Reader) Close() error {
	r.doneOnce.Do(func() {
		p := r.p
		p.mu.Lock()
		r.closed = true
		delete(p.readers, r)
		if r.parked {
			p.unparkLocked(r)
		}
		p.typist.CompareAndSwap(r, nil) // a client that left is not kept
		p.mu.Unlock()
		close(r.done)
	})
	return nil
}

// availableLocked reports whether readLocked has something to return.
func (r *Reader) availableLocked() bool {
	return len(r.pending) > 0 || r.cursor < r.p.ring.End()
}

// waitLocked parks the reader until output is available. It is called and
// returns with p.mu held, and releases it while parked.
func (r *Reader) waitLocked() error {
	p := r.p
	for !r.availableLocked() {
		switch {
		case r.closed:
			return ErrClosed
		case p.draining:
			return io.EOF
		}
		if !r.parked {
			r.parked = true
			r.parkedAt = len(p.parked)
			p.parked = append(p.parked, r)
		}
		p.mu.Unlock()
		select {
		case <-r.wake:
		case <-r.done:
		}
		p.mu.Lock()
	}
	if r.closed {
		return ErrClosed
	}
	return nil
}

// unparkLocked takes a parked reader out of p.parked without waking it.
// Knowing its place makes that constant time, so the typist can be woken
// alone on every read at any number of clients.
func (p *Proxy) unparkLocked(r *Reader) {
	last := len(p.parked) - 1
	moved := p.parked[last]
	p.parked[r.parkedAt] = moved
	moved.parkedAt = r.parkedAt
	p.parked[last] = nil
	p.parked = p.parked[:last]
	r.parked = false
}

// signal wakes the reader's goroutine if it waits, or makes its next wait
// return at once. It never blocks.
func (r *Reader) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// catchUpLocked moves a reader that fell more than a ring behind to the
// oldest retained line start and returns how many bytes it skipped, which
// also count in dropped; it returns 0 for a reader that had not fallen
// behind. Every reader, clients and the log writer alike, skips this way,
// so every drop count means the same thing.
func (r *Reader) catchUpLocked() uint64 {
	ring := r.p.ring
	start := ring.Start()
	if r.cursor >= start {
		return 0
	}
	next := ring.LineStart(start)
	skipped := next - r.cursor
	r.dropped += skipped
	r.cursor = next
	return skipped
}

// readLocked copies what is available into b without blocking. A reader
// found more than a ring behind either gets ErrTooSlow or skips to the oldest
// retained line start, counting the bytes in between and, when dropNotice is
// set, receiving a notice of exactly that count first.
func (r *Reader) readLocked(b []byte) (int, error) {
	if r.slow == SlowClientDisconnect && r.cursor < r.p.ring.Start() {
		return 0, ErrTooSlow
	}
	if skipped := r.catchUpLocked(); skipped > 0 && r.dropNotice {
		r.pending = append(r.pending, notice(noticeDropped(skipped), r.last == '\n')...)
	}
	var n int
	if len(r.pending) > 0 {
		n = copy(b, r.pending)
		r.pending = r.pending[n:]
		if len(r.pending) == 0 {
			r.pending = nil
		}
	} else {
		n, _ = r.p.ring.ReadAt(b, r.cursor)
		r.cursor += uint64(n)
	}
	if n > 0 {
		r.last = b[n-1]
	}
	return n, nil
}
