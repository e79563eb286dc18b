package main

import (
	"bytes"
	"net"
	"strconv"
	"sync"
	"time"
)

// client reads the stream and checks it. Checking is cheap on purpose, so
// that 1000 clients in one process do not measure themselves: a read
// without notices or echoes is checked by its first and last line and its
// length; otherwise line by line.
type client struct {
	conn net.Conn
	mu   sync.Mutex

	bytes     uint64 // bytes received
	next      uint64 // next pattern offset expected
	started   bool
	announced uint64 // bytes covered by drop notices
	silent    uint64 // gaps and duplicates no notice covered
	pending   uint64 // announced bytes not yet matched by a gap
	partial   []byte
	echoes    map[uint64]time.Time // echo seq -> when it was seen
	echoed    chan uint64          // when set, each echo's seq, if there is room
}

var dropPrefix = []byte("[consoleproxy] ")

func (c *client) run(readSize int, pace time.Duration, stop <-chan struct{}) {
	buf := make([]byte, readSize)
	for {
		n, err := c.conn.Read(buf)
		if n > 0 {
			c.mu.Lock()
			c.bytes += uint64(n)
			c.feed(buf[:n])
			c.mu.Unlock()
		}
		if err != nil {
			return
		}
		if pace > 0 {
			select {
			case <-stop:
				return
			case <-time.After(pace):
			}
		}
	}
}

func (c *client) feed(b []byte) {
	if len(c.partial) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			c.partial = append(c.partial, b...)
			return
		}
		c.line(append(c.partial, b[:i+1]...))
		c.partial = c.partial[:0]
		b = b[i+1:]
	}
	whole := len(b) / lineLen * lineLen
	// The fast path: only pattern lines, aligned.
	if whole > 0 && bytes.IndexByte(b[:whole], 'E') < 0 && bytes.IndexByte(b[:whole], '[') < 0 && b[whole-1] == '\n' && b[lineLen-1] == '\n' {
		first, ok1 := parseLine(b[:lineLen])
		last, ok2 := parseLine(b[whole-lineLen : whole])
		if ok1 && ok2 && last == (first+uint64(whole-lineLen))%window {
			c.pattern(first)
			c.next = (last + lineLen) % window
			b = b[whole:]
		}
	}
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			c.partial = append(c.partial, b...)
			return
		}
		c.line(b[:i+1])
		b = b[i+1:]
	}
}

func (c *client) line(l []byte) {
	switch {
	case bytes.HasPrefix(l, dropPrefix):
		if f := bytes.Fields(l[len(dropPrefix):]); len(f) >= 3 && string(f[1]) == "bytes" && string(f[2]) == "dropped" {
			n, _ := strconv.ParseUint(string(f[0]), 10, 64)
			c.announced += n
			c.pending += n
		}
	case len(l) == lineLen && l[0] == 'E':
		seq, _ := strconv.ParseUint(string(bytes.TrimLeft(l[1:lineLen-1], "0")), 10, 64)
		if c.echoes != nil {
			c.echoes[seq] = time.Now()
		}
		if c.echoed != nil {
			select {
			case c.echoed <- seq:
			default:
			}
		}
	case len(l) == lineLen:
		if off, ok := parseLine(l); ok {
			c.pattern(off)
			c.next = (off + lineLen) % window
		}
	case len(l) <= 2:
		// the CRLF before a notice
	default:
		// a line cut short by a notice: the drop count covers the rest
		c.next = (c.next + uint64(len(l)-2)) % window
	}
}

// pattern accounts for a pattern line at off arriving when c.next was due.
func (c *client) pattern(off uint64) {
	if !c.started {
		c.started = true
		return
	}
	switch {
	case off == c.next:
	case c.pending > 0:
		// An announced skip. Its count is in ring bytes (echo lines
		// included) and offsets wrap, so where it lands is not checked.
		c.pending = 0
	default:
		if off > c.next {
			c.silent += off - c.next
		} else {
			c.silent += c.next - off
		}
	}
}

func parseLine(l []byte) (uint64, bool) {
	if l[lineLen-1] != '\n' {
		return 0, false
	}
	var v uint64
	for _, ch := range l[:lineLen-1] {
		if ch < '0' || ch > '9' {
			return 0, false
		}
		v = v*10 + uint64(ch-'0')
	}
	return v, true
}
