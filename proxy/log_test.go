package proxy

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"testing"
)

// memLog is a console log in memory that fails every write with ENOSPC
// while full is set, as a full disk does, and whose next write reports a
// loss when lose is set, as logsink's does after its file was deleted.
type memLog struct {
	mu       sync.Mutex
	buf      bytes.Buffer
	full     bool
	lose     uint64
	failures int
}

// lossError is a Write error that reports output the log had accepted
// earlier and lost since, as logsink's does.
type lossError struct{ n uint64 }

func (e lossError) Error() string              { return "console.log: file was deleted; created it again" }
func (e lossError) Unlogged() (uint64, string) { return e.n, "log file deleted" }

func (m *memLog) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lose > 0 {
		n := m.lose
		m.lose = 0
		return 0, lossError{n}
	}
	if m.full {
		m.failures++
		return 0, &os.PathError{Op: "write", Path: "console.log", Err: syscall.ENOSPC}
	}
	return m.buf.Write(p)
}

func (m *memLog) setFull(full bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.full = full
}

func (m *memLog) setLose(n uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lose = n
}

func (m *memLog) snapshot() ([]byte, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.buf.Bytes()), m.failures
}

// runLog runs p.RunLog into w until the test ends.
func runLog(t *testing.T, p *testProxy, w *memLog) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := p.RunLog(ctx, w); err != nil {
			t.Errorf("RunLog: %v", err)
		}
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
}

func TestLogStartsAfterTheSeedAndMarksTheRestart(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{Seed: []byte("old history\npartial")})
	w := &memLog{}
	runLog(t, p, w)
	feed(t, p, vmm, []byte("new output\n"))
	conn := dial(t, p)
	want := "old history\npartial\r\n[consoleproxy] restarted; history above is from the console log\r\n" +
		"[consoleproxy] upstream connected\r\nnew output\n"
	if got := readN(t, conn, nil, len(want)); string(got) != want {
		t.Errorf("client got %q, want %q", got, want)
	}
	wantLog := want[len("old history\npartial"):]
	waitFor(t, "the log to catch up", func() bool { b, _ := w.snapshot(); return len(b) >= len(wantLog) })
	if got, _ := w.snapshot(); string(got) != wantLog {
		t.Errorf("log = %q, want %q", got, wantLog)
	}
}

func TestFullDiskNeitherSlowsClientsNorLosesSilently(t *testing.T) {
	checkLeaks(t)
	const ringSize = 64<<10 + 3 // not a multiple of the pattern's lines
	p, vmm := startPair(t, Config{BufferSize: ringSize})
	w := &memLog{}
	runLog(t, p, w)
	conn := dial(t, p)
	var clientGot []byte
	var off uint64
	send := func(n uint64) {
		for end := off + n; off < end; off += 4 << 10 {
			feed(t, p, vmm, pattern(off, 4<<10))
			// Keep the client within the ring, so it must lose nothing.
			clientGot = readUntil(t, conn, clientGot, "the client to keep up", func(b []byte) bool {
				data, _ := splitNotices(b)
				return len(data) >= int(off)+4<<10
			})
		}
	}
	send(64 << 10)
	waitFor(t, "the log to catch up", func() bool { b, _ := w.snapshot(); d, _ := splitNotices(b); return len(d) == int(off) })

	w.setFull(true)
	send(1 << 20) // sixteen rings while the disk is full
	if _, failures := w.snapshot(); failures == 0 {
		t.Fatal("the log writer did not try to write while the disk was full")
	}
	w.setFull(false)
	send(8 << 10)
	waitFor(t, "the log to resume", func() bool {
		b, _ := w.snapshot()
		return bytes.HasSuffix(b, pattern(off-patternLine, patternLine))
	})

	data, notices := splitNotices(clientGot)
	if _, end := checkContiguous(t, data); end != off || len(notices) != 1 {
		t.Errorf("client: %d contiguous bytes of %d, notices %q", end, off, notices)
	}
	log, _ := w.snapshot()
	_, notices = splitNotices(log)
	if len(notices) != 2 || notices[0] != noticeConnected {
		t.Fatalf("log notices = %q, want connected and one loss", notices)
	}
	var lost uint64
	if _, err := fmt.Sscanf(notices[1], "console log: %d bytes not logged (no space left on device)", &lost); err != nil {
		t.Fatalf("loss notice %q: %v", notices[1], err)
	}
	i := bytes.Index(log, []byte(noticePrefix+notices[1]))
	before, _ := splitNotices(log[:i])
	_, gapStart := checkContiguous(t, bytes.TrimSuffix(before, []byte("\r\n")))
	gapEnd, end := checkContiguous(t, log[i+len(noticePrefix)+len(notices[1])+2:])
	if gapEnd-gapStart != lost || end != off {
		t.Errorf("notice says %d lost; the log skips %d (%d to %d) and ends at %d of %d", lost, gapEnd-gapStart, gapStart, gapEnd, end, off)
	}
}

func TestShutdownFlushesTheLog(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	w := &memLog{}
	done := make(chan error, 1)
	go func() { done <- p.RunLog(context.Background(), w) }()
	out := pattern(0, 512<<10)
	feed(t, p, vmm, out)
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("RunLog: %v", err)
	}
	if got, _ := w.snapshot(); !bytes.Equal(got, append(bytes.Clone(connectedNotice), out...)) {
		t.Errorf("log holds %d bytes after shutdown, want %d", len(got), len(connectedNotice)+len(out))
	}
}

// A log that lost output it had accepted (its file deleted from under it)
// says so through its Write error; the loss notice goes before the next
// output, which is written at once, not after a backoff.
func TestLogLossReportedByTheWriterGetsTheNotice(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	w := &memLog{}
	runLog(t, p, w)
	feed(t, p, vmm, []byte("first\n"))
	waitFor(t, "the log to catch up", func() bool { b, _ := w.snapshot(); return bytes.HasSuffix(b, []byte("first\n")) })
	w.setLose(1234)
	feed(t, p, vmm, []byte("second\n"))
	waitFor(t, "the log to resume", func() bool { b, _ := w.snapshot(); return bytes.HasSuffix(b, []byte("second\n")) })
	want := string(connectedNotice) + "first\n[consoleproxy] console log: 1234 bytes not logged (log file deleted)\r\nsecond\n"
	if got, failures := w.snapshot(); string(got) != want || failures != 0 {
		t.Errorf("log = %q (%d failures), want %q", got, failures, want)
	}
}
