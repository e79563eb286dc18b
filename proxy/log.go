package proxy

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/consoleproxy/consoleproxy/upstream"
)

// Retry timing for a failing accept and a failing log write: soon at
// first, then no more than once a second.
const (
	minRetry = 10 * time.Millisecond
	maxRetry = time.Second
)

// logErrorInterval rate-limits the warnings about a failing console log: a
// full disk would otherwise produce one per retry.
const logErrorInterval = 30 * time.Second

// logReadSize is the most the log writer takes from the ring per write.
const logReadSize = 64 << 10

func noticeNotLogged(n uint64, reason string) string {
	return "console log: " + strconv.FormatUint(n, 10) + " bytes not logged (" + reason + ")"
}

// Unlogged is implemented by an error from the console log's Write that
// reports a loss, not a failure: output the log had accepted earlier is
// gone (logsink's LossError: its file was deleted from under it). Unlogged
// returns how many console bytes were lost and why, for the loss notice.
// Nothing failed: RunLog counts the bytes, writes the notice and the output
// again at once, without a backoff.
type Unlogged interface {
	Unlogged() (n uint64, reason string)
}

// RunLog copies the console output to w (the console log) until ctx is
// done, or until the proxy is shut down and w has received everything. The
// log writer is a reader of the ring like any client: it begins after the
// history that was in the ring at New (which came from the log itself) and
// falls behind on its own, never holding up the upstream. A failed write is
// retried with backoff; bytes that the ring overwrote meanwhile, or that the
// writer fell a ring behind on, are counted and marked in the log with a
// notice once writing resumes. A Write error that is an Unlogged adds its
// bytes to that notice and is not retried as a failure. Call RunLog at most
// once per Proxy; w must not return n < len(p) without an error.
func (p *Proxy) RunLog(ctx context.Context, w io.Writer) error {
	r := p.logReader
	log := p.log.Named("console-log")
	stop := context.AfterFunc(ctx, func() { r.Close() })
	defer stop()
	defer r.Close()

	buf := make([]byte, logReadSize)
	var (
		lost       uint64 // bytes not logged since the last notice
		lostReason string // why, when w said (Unlogged)
		lastErr    error  // why writes are failing, if they are
		lastWarned time.Time
		delay           = minRetry
		last       byte = '\n' // the last byte written, for notice framing
	)
	for {
		p.mu.Lock()
		if err := r.waitLocked(); err != nil {
			p.mu.Unlock()
			if lost > 0 {
				log.Warn("console log stopped with output not logged", "bytes", lost)
			}
			if errors.Is(err, ErrClosed) || errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		skipped := r.catchUpLocked()
		lost += skipped
		p.logNotLogged.Add(skipped)
		n, _ := p.ring.ReadAt(buf, r.cursor)
		p.mu.Unlock()

		chunk := buf[:n]
		var err error
		if lost > 0 {
			// The writer's own account of a loss names its cause; a
			// failure's text explains the bytes the ring overwrote
			// meanwhile.
			reason := "fell behind"
			if lostReason != "" {
				reason = lostReason
			} else if lastErr != nil {
				reason = errorText(lastErr)
			}
			_, err = w.Write(notice(noticeNotLogged(lost, reason), last == '\n'))
			if err == nil {
				log.Info("console log resumed", "bytes_not_logged", lost)
				lost, lostReason, last = 0, "", '\n'
			}
		}
		var written int
		if err == nil {
			written, err = w.Write(chunk)
			if written > 0 {
				last = chunk[written-1]
			}
		}
		p.mu.Lock()
		r.cursor += uint64(written)
		p.mu.Unlock()
		if err == nil {
			lastErr, delay = nil, minRetry
			continue
		}
		var u Unlogged
		if errors.As(err, &u) {
			unlogged, reason := u.Unlogged()
			if unlogged > 0 {
				lost += unlogged
				lostReason = reason
				p.logNotLogged.Add(unlogged)
			}
			log.Warn("console log lost output it had written", "bytes_not_logged", unlogged, "error", err)
			continue
		}
		if lastErr == nil || time.Since(lastWarned) >= logErrorInterval {
			log.Warn("console log write failed; retrying", "error", err)
			lastWarned = time.Now()
		}
		lastErr = err
		if !sleepOrDone(ctx, r.done, delay) {
			return nil
		}
		delay = min(2*delay, maxRetry)
	}
}

// errorText is the system's text for err, as a log notice gives it.
func errorText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return upstream.Reason(err)
}

// sleepOrDone waits for d, or until ctx is done or done is closed (a nil
// done never is), and reports whether d passed.
func sleepOrDone(ctx context.Context, done <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
	case <-done:
	}
	return false
}
