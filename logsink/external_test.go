package logsink

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Tests of what others do to the log's files behind its back: logrotate's
// copytruncate, an rm, a FIFO in the way.

// numbered returns console lines "NAME NNNNNN ...\n" adding up to at least
// n bytes, distinct from those of any other name.
func numbered(name string, n int) []byte {
	var b []byte
	for i := 0; len(b) < n; i++ {
		b = fmt.Appendf(b, "%s %06d %s\n", name, i, strings.Repeat(".", i%53))
	}
	return b
}

// fakeClock is a time source for Options.Now that moves only when told.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time            { return c.now }
func (c *fakeClock) advance(d time.Duration)   { c.now = c.now.Add(d) }
func newFakeClock() *fakeClock                 { return &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }
func (c *fakeClock) options(o Options) Options { o.Now = c.Now; return o }

// unlogged is what proxy.RunLog looks for in a Write error: output the log
// had accepted earlier and lost since.
type unlogged interface{ Unlogged() (uint64, string) }

// lossOf returns the bytes a Write error reports lost, and whether it
// reports a loss at all.
func lossOf(err error) (uint64, string, bool) {
	var u unlogged
	if !errors.As(err, &u) {
		return 0, "", false
	}
	n, reason := u.Unlogged()
	return n, reason, true
}

func mustWrite(t *testing.T, l *Log, b []byte) {
	t.Helper()
	if n, err := l.Write(b); n != len(b) || err != nil {
		t.Fatalf("Write(%d bytes) = %d, %v", len(b), n, err)
	}
}

// The report: logrotate's copytruncate emptied the file, then the
// disk filled in the middle of a write. Truncating back to the size the Log
// believed in extended the file with NULs, and the retry then duplicated
// what the partial write had left.
func TestFailedWriteAfterExternalTruncationLeavesNoNULs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	fail := false
	l, err := Open(path, Options{Seam: func(f *os.File) io.Writer { return failingSeam{f, &fail} }})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	writeInChunks(t, l, numbered("before", 300<<10))
	if err := os.Truncate(path, 0); err != nil { // copytruncate's truncate
		t.Fatal(err)
	}
	after := numbered("after", 8<<10)
	fail = true
	if n, err := l.Write(after); n != 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("failing Write = %d, %v; want 0, ENOSPC", n, err)
	}
	fail = false
	mustWrite(t, l, after)
	got := readFile(t, path)
	if nul := bytes.Count(got, []byte{0}); nul > 0 || !bytes.Equal(got, after) {
		t.Errorf("log holds %d bytes (%d NUL), want exactly the %d written after the truncation; starts %q",
			len(got), nul, len(after), got[:min(len(got), 40)])
	}
}

// The same with timestamps: the file the truncation left is empty, so the
// retried write starts a line and gets its timestamp.
func TestFailedWriteAfterExternalTruncationKeepsTimestampsRight(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	fail := false
	clock := newFakeClock()
	l, err := Open(path, clock.options(Options{Timestamps: true, Seam: func(f *os.File) io.Writer { return failingSeam{f, &fail} }}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	mustWrite(t, l, []byte("a line cut by the rotation"))
	os.Truncate(path, 0)
	fail = true
	l.Write([]byte(" continues\nnext\n"))
	fail = false
	mustWrite(t, l, []byte(" continues\nnext\n"))
	ts := "2026-01-02T03:04:05.000Z "
	if got, want := string(readFile(t, path)), ts+" continues\n"+ts+"next\n"; got != want {
		t.Errorf("log = %q, want %q", got, want)
	}
}

// After a copytruncate the next rotation counts from the file's real size,
// not from the size before the truncation (the issue saw one at 298 KB with
// a 1 MiB limit).
func TestRotationCountsFromTheRealSizeAfterExternalTruncation(t *testing.T) {
	const maxSize = 64 << 10
	path := filepath.Join(t.TempDir(), "console.log")
	// A clock that never moves: only the size limit can make the Log look.
	l, err := Open(path, newFakeClock().options(Options{MaxSize: maxSize, MaxFiles: 2}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	writeInChunks(t, l, numbered("before", 60<<10))
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	after := numbered("after", 150<<10)
	writeInChunks(t, l, after[:40<<10])
	if _, err := os.Stat(path + ".1"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("rotated at %d bytes of a %d limit: PATH.1 %v", 40<<10, maxSize, err)
	}
	writeInChunks(t, l, after[40<<10:])
	a, b, c := readFile(t, path+".2"), readFile(t, path+".1"), readFile(t, path)
	if !bytes.Equal(append(append(a, b...), c...), after) {
		t.Fatalf("PATH.2 PATH.1 PATH (%d+%d+%d bytes) are not what was written after the truncation", len(a), len(b), len(c))
	}
	for i, f := range [][]byte{a, b} {
		if len(f) < maxSize-CutWindow || len(f) > maxSize {
			t.Errorf("PATH.%d holds %d bytes; want %d to %d", 2-i, len(f), maxSize-CutWindow, maxSize)
		}
	}
}

// A copytruncate while the Log has been writing for a while is picked up by
// the periodic look at the file, so that timestamps start the new file's
// first line.
func TestExternalTruncationIsFollowedByTheNextLook(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	clock := newFakeClock()
	l, err := Open(path, clock.options(Options{Timestamps: true}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	mustWrite(t, l, []byte("mid-line"))
	os.Truncate(path, 0)
	clock.advance(2 * time.Second)
	mustWrite(t, l, []byte(" end\n"))
	if got, want := string(readFile(t, path)), "2026-01-02T03:04:07.000Z  end\n"; got != want {
		t.Errorf("log = %q, want %q", got, want)
	}
}

func TestDeletedFileIsNoticedAndCreatedAgain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	clock := newFakeClock()
	l, err := Open(path, clock.options(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	mustWrite(t, l, []byte("before\n"))
	clock.advance(2 * time.Second)
	mustWrite(t, l, []byte("looked before this\n")) // the look sees the file linked
	os.Remove(path)
	mustWrite(t, l, []byte("into the deleted file\n")) // within a second: not looked
	clock.advance(time.Second)
	n, err := l.Write([]byte("after\n"))
	lost, reason, ok := lossOf(err)
	if want := len("looked before this\ninto the deleted file\n"); n != 0 || !ok || lost != uint64(want) || !errors.Is(err, ErrDeleted) {
		t.Fatalf("Write after the deletion = %d, %v (loss %d %q, %v); want 0 and a loss of %d, ErrDeleted", n, err, lost, reason, ok, want)
	}
	if reason != "log file deleted" {
		t.Errorf("reason %q", reason)
	}
	mustWrite(t, l, []byte("after\n"))
	if got := string(readFile(t, path)); got != "after\n" {
		t.Errorf("new log = %q", got)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != FileMode {
		t.Errorf("new log: %v, mode %v", err, fi.Mode().Perm())
	}
}

// Nothing looks at the file while nothing is written; the first write
// after an idle deletion finds it. What was written after the last look
// that saw the file counts as lost: the Log cannot tell whether it went in
// before the deletion.
func TestDeletionWhileIdleIsNoticedAtTheNextWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	clock := newFakeClock()
	l, err := Open(path, clock.options(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	mustWrite(t, l, []byte("before\n"))
	clock.advance(2 * time.Second)
	mustWrite(t, l, []byte("looked\n"))
	clock.advance(time.Hour) // idle
	os.Remove(path)
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the Log recreated the file while idle: %v", err)
	}
	n, err := l.Write([]byte("after\n"))
	if lost, _, ok := lossOf(err); n != 0 || !ok || lost != uint64(len("looked\n")) {
		t.Fatalf("Write = %d, %v; want 0 and a loss of %d", n, err, len("looked\n"))
	}
	mustWrite(t, l, []byte("after\n"))
	if got := string(readFile(t, path)); got != "after\n" {
		t.Errorf("new log = %q", got)
	}
}

// With its directory gone the file cannot be created again: that is a
// write failure until the directory is back, and the loss is reported once
// writing resumes.
func TestDeletedDirectoryFailsWritesUntilItIsBack(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "logs")
	os.Mkdir(dir, 0o755)
	path := filepath.Join(dir, "console.log")
	clock := newFakeClock()
	l, err := Open(path, clock.options(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	mustWrite(t, l, []byte("lost\n"))
	os.RemoveAll(dir)
	mustWrite(t, l, []byte("lost too\n"))
	clock.advance(time.Second)
	for range 2 {
		n, err := l.Write([]byte("after\n"))
		if _, _, loss := lossOf(err); n != 0 || loss || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), path) {
			t.Fatalf("Write with the directory gone = %d, %v; want 0, a failure naming %s", n, err, path)
		}
		clock.advance(time.Second)
	}
	os.Mkdir(dir, 0o755)
	n, err := l.Write([]byte("after\n"))
	if lost, _, ok := lossOf(err); n != 0 || !ok || lost != uint64(len("lost\nlost too\n")) {
		t.Fatalf("Write with the directory back = %d, %v; want 0 and a loss of %d", n, err, len("lost\nlost too\n"))
	}
	mustWrite(t, l, []byte("after\n"))
	if got := string(readFile(t, path)); got != "after\n" {
		t.Errorf("new log = %q", got)
	}
}

// A rotation looks too: it does not rotate a deleted file into PATH.1.
func TestDeletedFileIsNoticedWhenRotating(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := Open(path, newFakeClock().options(Options{MaxSize: 100, MaxFiles: 2}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	first := numbered("first", 60)
	mustWrite(t, l, first)
	os.Remove(path)
	second := numbered("second", 60)
	n, err := l.Write(second)
	if lost, _, ok := lossOf(err); !ok || lost != uint64(len(first)+n) {
		t.Fatalf("Write across the limit = %d, %v; want a loss of %d+%d", n, err, len(first), n)
	}
	mustWrite(t, l, second[n:])
	if got := readFile(t, path); !bytes.Equal(got, second[n:]) {
		t.Errorf("new log = %q, want %q", got, second[n:])
	}
	for _, k := range []string{".1", ".2"} {
		if _, err := os.Lstat(path + k); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("PATH%s exists: %v", k, err)
		}
	}
}

// mkfifo makes a FIFO at path, and releases at cleanup whoever the code
// under test left blocked opening it.
func mkfifo(t *testing.T, path string) {
	t.Helper()
	if err := unix.Mkfifo(path, 0o640); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A peer on each side lets a blocked open return.
		for _, flag := range []int{unix.O_RDONLY, unix.O_WRONLY} {
			if fd, err := unix.Open(path, flag|unix.O_NONBLOCK, 0); err == nil {
				unix.Close(fd)
			}
		}
	})
}

// withinDeadline runs f and fails the test if it has not returned within
// a few seconds: opening a FIFO blocks until a peer comes.
func withinDeadline(t *testing.T, what string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatalf("%s blocked", what)
		return nil
	}
}

func TestFIFOIsRefusedWithoutBlocking(t *testing.T) {
	for _, at := range []string{"", ".1"} {
		t.Run("PATH"+at, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "console.log")
			mkfifo(t, path+at)
			wantMsg := "console log " + path + at + ": not a regular file (a FIFO)"
			err := withinDeadline(t, "ReadTail", func() error { _, err := ReadTail(path, 1000, false); return err })
			if err == nil || !strings.Contains(err.Error(), wantMsg) || !errors.Is(err, ErrNotRegular) {
				t.Errorf("ReadTail = %v; want %q", err, wantMsg)
			}
			if at != "" {
				return // Open never reads PATH.1
			}
			err = withinDeadline(t, "Open", func() error {
				l, err := Open(path, Options{})
				if err == nil {
					l.Close()
				}
				return err
			})
			if err == nil || !strings.Contains(err.Error(), wantMsg) || !errors.Is(err, ErrNotRegular) {
				t.Errorf("Open = %v; want %q", err, wantMsg)
			}
		})
	}
}

// A FIFO put at PATH behind the Log's back is refused on reopen (SIGHUP)
// without blocking, and the Log keeps failing its writes, not hanging.
func TestFIFOIsRefusedOnReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	os.Remove(path)
	mkfifo(t, path)
	if err := withinDeadline(t, "Reopen", l.Reopen); err == nil || !strings.Contains(err.Error(), "not a regular file (a FIFO)") {
		t.Errorf("Reopen = %v", err)
	}
	err = withinDeadline(t, "Write", func() error { _, err := l.Write([]byte("x\n")); return err })
	if err == nil || !strings.Contains(err.Error(), "not a regular file (a FIFO)") {
		t.Errorf("Write = %v", err)
	}
}

func TestOtherNonRegularFilesAreNamed(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(dir, Options{}); err == nil || !strings.Contains(err.Error(), dir+": not a regular file (a directory)") {
		t.Errorf("Open(directory) = %v", err)
	}
	if _, err := ReadTail("/dev/null", 10, false); err == nil || !strings.Contains(err.Error(), "/dev/null: not a regular file (a character device)") {
		t.Errorf("ReadTail(/dev/null) = %v", err)
	}
}
