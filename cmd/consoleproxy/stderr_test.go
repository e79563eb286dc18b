package main

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// stalledWriter blocks every write until released, as a pipe whose reader
// has stopped.
type stalledWriter struct {
	release chan struct{}
	mu      sync.Mutex
	b       bytes.Buffer
}

func (w *stalledWriter) Write(p []byte) (int, error) {
	<-w.release
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *stalledWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

func TestLogLinesNeverWaitForStderrAndDropsAreCounted(t *testing.T) {
	out := &stalledWriter{release: make(chan struct{})}
	q := newLineQueue(out)
	log := hclog.New(&hclog.LoggerOptions{Output: q, Level: hclog.Info})
	q.log = log
	const lines = 3 * stderrQueueLines
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range lines {
			log.Info("line", "n", i)
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("logging blocked on a stalled stderr")
	}
	close(out.release)
	q.Close()
	got := out.String()
	written := strings.Count(got, "[INFO]  line:")
	var dropped int
	for _, l := range strings.Split(got, "\n") {
		if _, rest, ok := strings.Cut(l, "daemon log lines dropped: stderr was not keeping up: lines="); ok {
			var n int
			fmt.Sscan(rest, &n)
			dropped += n
		}
	}
	if written+dropped != lines || dropped == 0 {
		t.Errorf("%d lines written and %d counted as dropped, want %d in all with some dropped", written, dropped, lines)
	}
}
