package upstream

import (
	"context"
	"path/filepath"
	"time"

	"github.com/consoleproxy/consoleproxy/watch"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// pathID identifies what a path names, following symlinks: a VMM that
// restarts creates a new socket at the same path. Filesystems reuse a freed
// inode number at once, so the change time, set when the file is created,
// is part of the identity.
type pathID struct {
	dev, ino uint64
	ctime    unix.Timespec
	exists   bool
}

func statPath(path string) pathID {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return pathID{}
	}
	return pathID{dev: st.Dev, ino: st.Ino, ctime: st.Ctim, exists: true}
}

// pathWatch waits for changes on the way to the upstream's path, through
// the process's shared Watcher. It holds the Watcher's inotify instance
// only while the upstream is down: the kernel allows each user 128
// instances by default, and a host running one proxy per VM must not spend
// them on proxies that are connected. While the upstream stays down, the
// hold keeps one instance for every wait: closing one waits for a kernel
// grace period, which would otherwise fall between the socket appearing
// and the dial.
type pathWatch struct {
	path    string
	log     hclog.Logger
	w       *watch.Watcher
	release func() // ends the hold; nil while none
	warned  bool   // that inotify is unavailable
}

func newPathWatch(path string, w *watch.Watcher, log hclog.Logger) *pathWatch {
	return &pathWatch{path: filepath.Clean(path), w: w, log: log}
}

// hold keeps the instance while the upstream is down, and reports whether
// there is one. Without one, waits just sleep, and the operator is told
// once.
func (w *pathWatch) hold() bool {
	if w.release != nil {
		return true
	}
	release, err := w.w.Hold()
	if err != nil {
		if !w.warned {
			w.log.Warn("cannot watch for the upstream's path; retrying on the backoff timer only", "error", err)
			w.warned = true
		}
		return false
	}
	w.release = release
	return true
}

// unhold gives the instance back once the upstream is connected.
func (w *pathWatch) unhold() {
	if w.release != nil {
		w.release()
		w.release = nil
	}
}

// wait waits up to timeout for a change that may let the path be opened:
// the path, or the missing directory on the way to it, being created, or
// the path naming something other than before (what statPath returned
// before the last attempt). It watches the nearest existing ancestor, so
// the wait costs no CPU and ends within milliseconds of the change; it
// reports whether such a change woke it. Where inotify is unavailable it
// simply sleeps. It returns early when ctx is done.
func (w *pathWatch) wait(ctx context.Context, timeout time.Duration, before pathID) bool {
	path := w.path
	dir, name := nearestExisting(path)
	if dir == "" || !w.hold() {
		sleep(ctx, timeout)
		return false
	}
	changed := make(chan struct{}, 1)
	cancel, err := w.w.Watch(dir, func(e watch.Event) {
		if e.Gone || e.Overflow || e.Name == name {
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	})
	if err != nil {
		sleep(ctx, timeout)
		return false
	}
	defer cancel()
	// What changed before the watch began, the comparison with before
	// sees directly.
	if d, n := nearestExisting(path); d != dir || n != name || statPath(path) != before {
		return true
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-changed:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return false
}

// nearestExisting returns the deepest existing directory on the way to path
// and the name in it that leads to path (path's own base name when its
// directory exists). It returns "" when not even the root can be seen.
func nearestExisting(path string) (dir, name string) {
	dir, name = watch.NearestDir(filepath.Dir(path))
	if dir != "" && name == "" {
		name = filepath.Base(path)
	}
	return dir, name
}
