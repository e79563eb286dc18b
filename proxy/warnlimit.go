package proxy

import (
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// warnInterval is how often a repeated warning (a refusal, a takeover)
// reaches the daemon log. A peer that connects in a loop must not flood
// it: the log's reader may be slow, and an operator wants one line and a
// count, not thousands of lines.
const warnInterval = 10 * time.Second

// warnLimiter lets one warning of a kind through per warnInterval and
// counts the others; the count is logged when the interval ends, so a
// burst that stops is still accounted for. Its timer is armed only while
// warnings are being held back: idle, it costs nothing. Safe for
// concurrent use.
type warnLimiter struct {
	log hclog.Logger
	msg string

	mu         sync.Mutex
	last       time.Time   // when a warning was last let through
	suppressed uint64      // held back since
	timer      *time.Timer // armed while suppressed > 0
	stopped    bool
}

func newWarnLimiter(log hclog.Logger, msg string) *warnLimiter {
	return &warnLimiter{log: log, msg: msg}
}

// warn logs the warning with args, or counts it when one was logged less
// than warnInterval ago.
func (l *warnLimiter) warn(args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return
	}
	if now.Sub(l.last) < warnInterval {
		l.suppressed++
		if l.timer == nil {
			l.timer = time.AfterFunc(warnInterval-now.Sub(l.last), l.flush)
		}
		l.mu.Unlock()
		return
	}
	l.last = now
	l.mu.Unlock()
	l.log.Warn(l.msg, args...)
}

// flush logs how many warnings were held back, once their interval ended.
func (l *warnLimiter) flush() {
	l.mu.Lock()
	n := l.suppressed
	l.suppressed, l.timer = 0, nil
	l.last = time.Now()
	l.mu.Unlock()
	if n > 0 {
		l.log.Warn(l.msg+" (repeated)", "times", n, "within", warnInterval)
	}
}

// stop logs the count held back so far, if any, and disarms the timer.
func (l *warnLimiter) stop() {
	l.mu.Lock()
	l.stopped = true
	t := l.timer
	l.timer = nil
	l.mu.Unlock()
	if t != nil && t.Stop() {
		l.flush()
	}
}
