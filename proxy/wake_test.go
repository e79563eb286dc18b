package proxy

import (
	"errors"
	"io"
	"testing"
	"testing/synctest"
	"time"
)

// TestTypistIsNeverCoalesced checks the wake rule on a fake clock: output
// after a quiet spell reaches every reader at once; output that comes
// within the coalescing window reaches the typist at once, and the other
// readers when the window ends.
func TestTypistIsNeverCoalesced(t *testing.T) {
	checkLeaks(t)
	synctest.Test(t, func(t *testing.T) {
		p, err := New(Config{Upstream: &UnixUpstream{Path: "unused"}, Replay: ReplayNone, DisableNotices: true})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		typist, typed := startTestReader(t, p)
		_, viewed := startTestReader(t, p)
		start := time.Now()

		p.appendOutput([]byte("a"))
		if got, got2 := received(typed), received(viewed); got != "a" || got2 != "a" {
			t.Fatalf("after a quiet spell: the readers received %q and %q at once, want \"a\" for both", got, got2)
		}

		// The typist's client types; its echo comes right after the output
		// before it, as in a request/response loop.
		p.inputMu.Lock()
		p.upstream = io.Discard
		p.inputMu.Unlock()
		if err := p.queueInput([]byte("k"), &client{r: typist}); err != nil {
			t.Fatal(err)
		}
		p.appendOutput([]byte("k"))
		if got := received(typed); got != "k" {
			t.Fatalf("the typist received %q at once, want the echo", got)
		}
		if got := received(viewed); got != "" {
			t.Fatalf("a viewer received %q within the window, want it coalesced", got)
		}
		if d := time.Since(start); d != 0 {
			t.Fatalf("the echo took %v of the fake clock, want none", d)
		}
		time.Sleep(coalesceWindow)
		if got := received(viewed); got != "k" {
			t.Fatalf("a viewer received %q when the window ended, want the echo", got)
		}

		typist.Close()
		if p.typist.Load() != nil {
			t.Error("the typist's reader is still held after it closed")
		}
	})
}

// startTestReader starts a goroutine that reads a new Reader until it is
// closed, at the latest when the test ends, and sends each read on the
// channel it returns, which it closes at the end.
func startTestReader(t *testing.T, p *Proxy) (*Reader, <-chan string) {
	t.Helper()
	r, err := p.NewReader()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	out := make(chan string, 16)
	go func() {
		defer close(out)
		buf := make([]byte, 64)
		for {
			n, err := r.Read(buf)
			if err != nil {
				if !errors.Is(err, ErrClosed) {
					t.Errorf("Read: %v", err)
				}
				return
			}
			out <- string(buf[:n])
		}
	}()
	return r, out
}

// received returns what reached a test reader by the time every goroutine
// in the bubble is blocked, without waiting for the fake clock.
func received(ch <-chan string) string {
	synctest.Wait()
	var s string
	for {
		select {
		case b, ok := <-ch:
			if !ok {
				return s
			}
			s += b
		default:
			return s
		}
	}
}
