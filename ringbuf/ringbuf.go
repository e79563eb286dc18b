// Package ringbuf keeps the last N bytes of one byte stream, addressed by
// absolute offsets.
//
// Every byte ever written has an absolute uint64 offset: the first byte is 0,
// and offsets never wrap in practice (2^64 bytes is centuries at line rate).
// The ring retains the bytes [Start, End). Readers keep their own offset (a
// cursor) and read at it; reads do not consume, so any number of readers walk
// the same bytes independently, and a reader that falls behind learns exactly
// how many bytes it lost.
//
// A Ring does no I/O, starts no goroutine and holds no lock: it is not safe
// for concurrent use. Its owner serialises every call with its own mutex
// (package proxy holds one mutex around the ring and its readers).
package ringbuf

import "bytes"

// LineSearchWindow is how far LineStart looks for a newline: a replay that
// would begin mid-line skips to the next line only when one starts within
// this many bytes.
const LineSearchWindow = 4096

// Ring holds the most recent Size bytes of a stream. The zero value is not
// usable; create one with New.
type Ring struct {
	buf []byte
	end uint64 // offset one past the newest byte; also the total written

	// beforeStart is the byte at offset Start()-1 once the ring has wrapped.
	// It is kept so that LineStart can tell whether the oldest retained byte
	// begins a line, which the bytes alone cannot say.
	beforeStart byte
}

// New returns an empty ring that retains the last size bytes. It panics if
// size is not positive: callers validate user-supplied sizes first.
func New(size int) *Ring {
	if size <= 0 {
		panic("ringbuf: size must be positive")
	}
	return &Ring{buf: make([]byte, size)}
}

// Size returns the capacity given to New.
func (r *Ring) Size() int { return len(r.buf) }

// End returns the offset one past the newest byte: the number of bytes ever
// written.
func (r *Ring) End() uint64 { return r.end }

// Start returns the offset of the oldest retained byte.
func (r *Ring) Start() uint64 {
	if size := uint64(len(r.buf)); r.end > size {
		return r.end - size
	}
	return 0
}

// Write appends p. It always succeeds: when p and the retained bytes exceed
// the capacity, the oldest bytes are overwritten, and when p alone exceeds it,
// only its tail is kept.
func (r *Ring) Write(p []byte) {
	if len(p) == 0 {
		return
	}
	size := uint64(len(r.buf))
	oldStart := r.Start()
	newEnd := r.end + uint64(len(p))
	if newEnd > size {
		if newStart := newEnd - size; newStart > oldStart {
			// The byte just before the new start is either in p or still in
			// the old contents, which are about to be overwritten.
			if at := newStart - 1; at >= r.end {
				r.beforeStart = p[at-r.end]
			} else {
				r.beforeStart = r.buf[at%size]
			}
		}
	}
	if uint64(len(p)) > size {
		r.end += uint64(len(p)) - size
		p = p[uint64(len(p))-size:]
	}
	pos := r.end % size
	n := copy(r.buf[pos:], p)
	copy(r.buf, p[n:])
	r.end = newEnd
}

// ReadAt copies retained bytes starting at offset off into p and returns how
// many it copied. When off is older than Start, lost is the number of bytes
// between off and Start that are gone, and copying begins at Start; the
// reader's next offset is then off+lost+n. An offset past End copies nothing.
func (r *Ring) ReadAt(p []byte, off uint64) (n int, lost uint64) {
	if start := r.Start(); off < start {
		lost = start - off
		off = start
	}
	if off >= r.end {
		return 0, lost
	}
	if avail := r.end - off; uint64(len(p)) > avail {
		p = p[:avail]
	}
	size := uint64(len(r.buf))
	pos := off % size
	n = copy(p, r.buf[pos:])
	n += copy(p[n:], r.buf)
	return n, lost
}

// ByteAt returns the byte at offset off. It reports false when that byte is
// neither retained nor the one just before Start.
func (r *Ring) ByteAt(off uint64) (byte, bool) {
	start := r.Start()
	switch {
	case off >= r.end:
		return 0, false
	case off >= start:
		return r.buf[off%uint64(len(r.buf))], true
	case start > 0 && off == start-1:
		return r.beforeStart, true
	}
	return 0, false
}

// LineStart returns where a reader that wants to begin at off should begin
// so that it does not start mid-line. Offset 0 and an offset whose preceding
// byte is a newline are already line starts. Otherwise the result is the
// offset after the first newline within LineSearchWindow bytes of off (only
// retained bytes are searched), or off itself when there is none. An off
// older than Start is treated as Start.
func (r *Ring) LineStart(off uint64) uint64 {
	if start := r.Start(); off < start {
		off = start
	}
	if off == 0 || off >= r.end {
		return off
	}
	if b, ok := r.ByteAt(off - 1); ok && b == '\n' {
		return off
	}
	limit := min(off+LineSearchWindow, r.end)
	size := uint64(len(r.buf))
	for at := off; at < limit; {
		pos := at % size
		chunk := r.buf[pos:min(size, pos+(limit-at))]
		if i := bytes.IndexByte(chunk, '\n'); i >= 0 {
			return at + uint64(i) + 1
		}
		at += uint64(len(chunk))
	}
	return off
}
