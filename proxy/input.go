package proxy

import (
	"errors"
	"io"
)

// maxQueuedInput bounds the input waiting for the upstream to take it. A
// VMM that stops reading (a hung or panicked guest no longer drains its
// UART) must cost a bounded amount of memory and must not hold up the
// clients that typed: past this bound input is discarded and counted. It
// is large enough for a paste into a console that reads slowly.
const maxQueuedInput = 256 << 10

// Errors from WriteInput.
var (
	// ErrUpstreamDown is returned while the upstream is not connected. The
	// input is discarded, as a client's would be.
	ErrUpstreamDown = errors.New("upstream not connected")
	// ErrInputQueueFull is returned while the upstream is not reading its
	// input and the queue for it is full. The input is discarded.
	ErrInputQueueFull = errors.New("upstream is not reading input; input queue full")
)

// inputChunk is one client read (or one WriteInput) on its way to the
// upstream. It is written with one Write, so it is never interleaved with
// another.
type inputChunk struct {
	b    []byte
	from *client // nil for WriteInput
}

// WriteInput queues b for the VMM as one write, never interleaved with a
// client's input, as if a read-write client had typed it. It does not wait
// for the VMM. It returns ErrUpstreamDown while the upstream is not
// connected and ErrInputQueueFull while the VMM is not reading; either way
// b is discarded.
func (p *Proxy) WriteInput(b []byte) error {
	return p.queueInput(b, nil)
}

// queueInput hands one read to the upstream's input writer, copying it. It
// holds inputMu only for the copy: a VMM that does not read delays its
// input, never the client that typed, the client's departure or Stats.
func (p *Proxy) queueInput(b []byte, from *client) error {
	p.inputMu.Lock()
	var err error
	newlyFull := false
	switch {
	case p.upstream == nil:
		p.discardedDown += uint64(len(b))
		err = ErrUpstreamDown
	case p.inputQueued+len(b) > maxQueuedInput:
		newlyFull = !p.inputFull
		p.inputFull = true
		p.discardedFull += uint64(len(b))
		err = ErrInputQueueFull
	default:
		p.inputQueue = append(p.inputQueue, inputChunk{b: append([]byte(nil), b...), from: from})
		p.inputQueued += len(b)
		if from != nil {
			p.typist.Store(from.r) // its echo is never coalesced; see appendOutput
		}
		select {
		case p.inputWake <- struct{}{}:
		default:
		}
	}
	queued := p.inputQueued
	p.inputMu.Unlock()
	if newlyFull {
		p.upLog.Warn("upstream is not reading input; discarding input until it does", "queued_bytes", queued)
	}
	if err != nil && from != nil {
		from.discarded.Add(uint64(len(b)))
	}
	return err
}

// writeInputTo writes queued input to conn, one chunk per Write, until
// stop is closed or a write fails. The upstream's drain runs it for the
// connection's life and waits for it. It is the only writer to the
// upstream, so chunks keep the order they were queued in, and the only
// goroutine that waits for a VMM that does not read.
func (p *Proxy) writeInputTo(conn io.Writer, stop <-chan struct{}) {
	for {
		p.inputMu.Lock()
		for len(p.inputQueue) == 0 {
			p.inputMu.Unlock()
			select {
			case <-p.inputWake:
			case <-stop:
				return
			}
			p.inputMu.Lock()
		}
		c := p.inputQueue[0]
		p.inputQueue[0] = inputChunk{}
		p.inputQueue = p.inputQueue[1:]
		p.inputMu.Unlock()

		_, err := conn.Write(c.b)

		p.inputMu.Lock()
		p.inputQueued -= len(c.b)
		if len(p.inputQueue) == 0 {
			p.inputQueue = nil // let a burst's backing array go
		}
		// The outage ends when the VMM has taken everything queued, not at
		// its first sip: a deaf VMM's socket buffer takes a little now and
		// then, and each would be logged as a recovery.
		resumed, discarded := false, uint64(0)
		if err == nil && p.inputFull && len(p.inputQueue) == 0 {
			resumed, discarded = true, p.discardedFull
			p.inputFull, p.discardedFull = false, 0
		}
		p.inputMu.Unlock()
		if resumed {
			p.upLog.Info("upstream is reading input again", "input_discarded", discarded)
		}
		p.countInput(c, err == nil)
		if err != nil {
			return // the drain sees the same failure and reports the loss
		}
	}
}

// dropQueuedInput discards the input still queued when a connection ends,
// counting it as discarded while the upstream was down.
func (p *Proxy) dropQueuedInput() {
	p.inputMu.Lock()
	q := p.inputQueue
	p.inputQueue, p.inputQueued = nil, 0
	p.inputFull = false
	for _, c := range q {
		p.discardedDown += uint64(len(c.b))
	}
	full := p.discardedFull
	p.discardedFull = 0
	p.inputMu.Unlock()
	if full > 0 {
		p.upLog.Info("upstream lost with its input queue full", "input_discarded", full)
	}
	for _, c := range q {
		p.countInput(c, false)
	}
}

// countInput adds a chunk's fate to its client's figures, or to the
// totals when the client has gone meanwhile, so that every byte a client
// sent counts once, as sent or as discarded.
func (p *Proxy) countInput(c inputChunk, sent bool) {
	if c.from == nil {
		return
	}
	n := uint64(len(c.b))
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, live := p.clients[c.from]; live {
		if sent {
			c.from.bytesIn.Add(n)
		} else {
			c.from.discarded.Add(n)
		}
		return
	}
	if sent {
		p.totals.BytesIn += n
	} else {
		p.totals.InputDiscarded += n
	}
}
