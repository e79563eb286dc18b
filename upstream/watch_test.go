package upstream

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// forever is a wait's timeout when only an event may end it: a test that
// reaches it has failed.
const forever = time.Hour

// waitsFor runs w.wait in the background and returns a function that
// reports its result, failing the test if it takes longer than waitTimeout.
func waitsFor(t *testing.T, w *pathWatch, timeout time.Duration) func() bool {
	t.Helper()
	path := w.path
	before := statPath(path)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	result := make(chan bool, 1)
	go func() { result <- w.wait(ctx, timeout, before) }()
	return func() bool {
		t.Helper()
		select {
		case ok := <-result:
			return ok
		case <-time.After(waitTimeout):
			cancel()
			<-result
			t.Fatalf("the wait for %s did not end", path)
			return false
		}
	}
}

// armed waits until w watches dir, as the kernel lists it in the inotify
// descriptor's fdinfo, so that what the test does next happens during the
// wait and not before it.
func armed(t *testing.T, w *pathWatch, dir string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(" ino:%x ", st.Ino)
	waitFor(t, "the watch on "+dir, func() bool {
		fds, _ := os.ReadDir("/proc/self/fd")
		for _, fd := range fds {
			if target, _ := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); target != "anon_inode:inotify" {
				continue
			}
			info, _ := os.ReadFile("/proc/self/fdinfo/" + fd.Name())
			for _, line := range strings.Split(string(info), "\n") {
				if strings.HasPrefix(line, "inotify wd:") && strings.Contains(line, want) {
					return true
				}
			}
		}
		return false
	})
}

// The instance is kept across waits (closing one costs a kernel grace
// period per attach), so each wait's watch must move between directories,
// survive its directory being replaced, and not be woken by events about
// what happened before the wait began.
func TestPathWatchAcrossWaits(t *testing.T) {
	checkLeaks(t)
	base := t.TempDir()
	dir := filepath.Join(base, "vm")
	path := filepath.Join(dir, "vmm.sock")
	watcher := watch.New()
	defer watcher.Close()
	w := newPathWatch(path, watcher, hclog.NewNullLogger())
	defer w.unhold()
	if !w.hold() {
		t.Skip("inotify is unavailable")
	}

	// The directory is missing: the parent is watched, and the
	// directory's creation ends the wait.
	done := waitsFor(t, w, forever)
	armed(t, w, base)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if !done() {
		t.Fatal("creating the missing directory did not end the wait")
	}

	// Now the directory itself is watched: the path's name appearing, not
	// another's, ends the wait.
	done = waitsFor(t, w, forever)
	armed(t, w, dir)
	if err := os.WriteFile(filepath.Join(dir, "other"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if !done() {
		t.Fatal("the path appearing did not end the wait")
	}

	// Events queued while nobody waited (here: the path removed and
	// created again, as while the proxy was connected) are about the
	// past: a wait that begins after them times out.
	os.Remove(path)
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if done = waitsFor(t, w, 50*time.Millisecond); done() {
		t.Fatal("events from before the wait ended it")
	}

	// The directory is replaced: the wait ends, and the next one watches
	// the new directory.
	done = waitsFor(t, w, forever)
	armed(t, w, dir)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if !done() {
		t.Fatal("removing the watched directory did not end the wait")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if !appearingEndsWait(t, w) {
		t.Fatal("the path appearing in the new directory did not end the wait")
	}

	// The same, with the directory replaced while nobody waited: the
	// kernel dropped the old watch, and the wait must not rely on it.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if !appearingEndsWait(t, w) {
		t.Fatal("the path appearing in a directory replaced between waits did not end the wait")
	}
}

// appearingEndsWait waits for w's path, creates it once its directory is
// watched, and returns what the wait returned.
func appearingEndsWait(t *testing.T, w *pathWatch) bool {
	t.Helper()
	done := waitsFor(t, w, forever)
	armed(t, w, filepath.Dir(w.path))
	if err := os.WriteFile(w.path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return done()
}
