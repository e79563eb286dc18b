package logsink

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Tests of what others do to the log's files behind its back: a FIFO in the
// way.

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
