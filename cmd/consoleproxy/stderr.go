package main

import (
	"io"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// stderrQueueLines bounds the daemon log lines waiting for stderr.
const stderrQueueLines = 1024

// stderrFlushTimeout bounds how long a stopping daemon waits for its last
// log lines to reach stderr.
const stderrFlushTimeout = time.Second

// lineQueue stands between the daemon's loggers and stderr, so that
// logging never blocks: a stalled journald or pipe reader would otherwise
// hold up whatever logged, an accept, a reconnect, a signal. Writes queue a
// copy of the line and return at once; one goroutine writes the queue out.
// When the queue is full lines are dropped, and a later line says how many.
// When stderr is gone (EPIPE) lines are discarded: the daemon runs on.
type lineQueue struct {
	out io.Writer

	mu      sync.Mutex
	lines   [][]byte
	dropped uint64
	closed  bool
	wake    chan struct{} // one slot: lines were queued, or closed
	done    chan struct{} // closed when run returns

	// log reports dropped lines through the queue itself, so the report has
	// the daemon log's format. Set once, before the first Write.
	log hclog.Logger
}

// newLineQueue starts the goroutine that writes to out; Close ends it.
func newLineQueue(out io.Writer) *lineQueue {
	q := &lineQueue{out: out, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go q.run()
	return q
}

// Write queues one log line (hclog writes a line per call). It never
// blocks on stderr and never fails. Lines written while Close flushes are
// written too (the count of dropped lines among them).
func (q *lineQueue) Write(p []byte) (int, error) {
	q.mu.Lock()
	switch {
	case len(q.lines) >= stderrQueueLines:
		q.dropped++
	default:
		q.lines = append(q.lines, append([]byte(nil), p...))
	}
	q.mu.Unlock()
	q.signal()
	return len(p), nil
}

func (q *lineQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *lineQueue) run() {
	defer close(q.done)
	broken := false
	for {
		q.mu.Lock()
		lines, dropped, closed := q.lines, q.dropped, q.closed
		q.lines, q.dropped = nil, 0
		q.mu.Unlock()
		for _, l := range lines {
			if broken {
				break
			}
			if _, err := q.out.Write(l); err != nil {
				// Nobody reads stderr any more (EPIPE, a closed file):
				// that is no reason to stop serving the console.
				broken = true
			}
		}
		if dropped > 0 && !broken && q.log != nil {
			q.log.Warn("daemon log lines dropped: stderr was not keeping up", "lines", dropped)
		}
		if closed && len(lines) == 0 && dropped == 0 {
			return
		}
		if len(lines) == 0 && dropped == 0 {
			<-q.wake
		}
	}
}

// Close writes out what is queued, for at most stderrFlushTimeout, and
// ends the writer. A writer stuck on a stderr that never drains is left to
// the process's exit.
func (q *lineQueue) Close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
	select {
	case <-q.done:
	case <-time.After(stderrFlushTimeout):
	}
}
