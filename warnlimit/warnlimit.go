// Package warnlimit rate-limits repeated warnings in the daemon log: a peer
// that connects in a loop must not flood it, since the log's reader may be
// slow and an operator wants one line and a count, not thousands of lines.
package warnlimit

import (
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Interval is how often a repeated warning (a refusal, a takeover) reaches
// the daemon log.
const Interval = 10 * time.Second

// Limiter lets one warning of a kind through per Interval and
// counts the others; the count is logged when the interval ends, so a
// burst that stops is still accounted for. Its timer is armed only while
// warnings are being held back: idle, it costs nothing. Safe for
// concurrent use.
type Limiter struct {
	log hclog.Logger
	msg string

	mu         sync.Mutex
	last       time.Time   // when a warning was last let through
	suppressed uint64      // held back since
	timer      *time.Timer // armed while suppressed > 0
	stopped    bool
}

// New returns a Limiter for the warning msg, logged to log.
func New(log hclog.Logger, msg string) *Limiter {
	return &Limiter{log: log, msg: msg}
}

// Warn logs the warning with args, or counts it when one was logged less
// than Interval ago. It never blocks on the log.
func (l *Limiter) Warn(args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return
	}
	if now.Sub(l.last) < Interval {
		l.suppressed++
		if l.timer == nil {
			l.timer = time.AfterFunc(Interval-now.Sub(l.last), l.flush)
		}
		l.mu.Unlock()
		return
	}
	l.last = now
	l.mu.Unlock()
	l.log.Warn(l.msg, args...)
}

// flush logs how many warnings were held back, once their interval ended.
func (l *Limiter) flush() {
	l.mu.Lock()
	n := l.suppressed
	l.suppressed, l.timer = 0, nil
	l.last = time.Now()
	l.mu.Unlock()
	if n > 0 {
		l.log.Warn(l.msg+" (repeated)", "times", n, "within", Interval)
	}
}

// Stop logs the count held back so far, if any, and disarms the timer;
// later warnings are dropped. Safe to call more than once.
func (l *Limiter) Stop() {
	l.mu.Lock()
	l.stopped = true
	t := l.timer
	l.timer = nil
	l.mu.Unlock()
	if t != nil && t.Stop() {
		l.flush()
	}
}
