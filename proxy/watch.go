package proxy

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// watchMask is what makes a path worth dialing again: a name created or
// moved into place, or a changed mode; and the watched directory itself
// going away, which means watching a higher one instead.
const watchMask = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_ATTRIB |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

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

// pathWatch waits for changes on the way to the upstream's path. It holds
// an inotify instance only while the upstream is down: the kernel allows
// each user 128 instances by default, and a host running one proxy per VM
// must not spend them on proxies that are connected. While the upstream
// stays down, one instance serves every wait: closing one waits for a
// kernel grace period (19 ms measured here, with strace), which would
// otherwise fall between the socket appearing and the dial.
type pathWatch struct {
	path   string
	log    hclog.Logger
	f      *os.File // the instance, nil while released
	fd     int
	wd     int  // the current watch, or -1
	warned bool // that inotify is unavailable
	closes sync.WaitGroup
}

func newPathWatch(path string, log hclog.Logger) *pathWatch {
	return &pathWatch{path: filepath.Clean(path), log: log}
}

// open readies an instance, when none is held, and reports whether there is
// one. Without one, waits just sleep, and the operator is told once.
func (w *pathWatch) open() bool {
	if w.f != nil {
		return true
	}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		if !w.warned {
			w.log.Warn("cannot watch for the upstream's path; retrying on the backoff timer only", "error", err)
			w.warned = true
		}
		return false
	}
	// Non-blocking, so os.File hands it to the poller: reads park without
	// a thread and honour deadlines.
	w.f, w.fd, w.wd = os.NewFile(uintptr(fd), "inotify"), fd, -1
	return true
}

// release gives the instance back once the upstream is connected. The
// close runs in the background, so the grace period does not hold up the
// drain of the new connection; Close waits for it.
func (w *pathWatch) release() {
	if f := w.f; f != nil {
		w.f = nil
		w.closes.Go(func() { f.Close() })
	}
}

// Close releases the instance and returns once it is closed.
func (w *pathWatch) Close() {
	w.release()
	w.closes.Wait()
}

// wait waits up to timeout for a change that may let the path be opened:
// the path, or the missing directory on the way to it, being created, or
// the path naming something other than before (what statPath returned
// before the last attempt). It watches the nearest existing ancestor, so
// the wait costs no CPU and ends within milliseconds of the change; it
// reports whether such a change woke it. Where inotify is unavailable it
// simply sleeps. It returns early when ctx is done.
func (w *pathWatch) wait(ctx context.Context, timeout time.Duration, before pathID) bool {
	deadline := time.Now().Add(timeout)
	path := w.path
	dir, name := nearestExisting(path)
	if dir == "" || !w.open() || !w.watch(dir) {
		sleep(ctx, timeout)
		return false
	}
	// Events queued until now describe changes that the comparison with
	// before sees directly; only events after it are news.
	w.discardQueued()
	if d, n := nearestExisting(path); d != dir || n != name || statPath(path) != before {
		return true
	}
	f := w.f // the callback below may run after release
	f.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, 4096)
	for {
		n, err := f.Read(buf)
		if err != nil {
			return false // deadline, or ctx done
		}
		for ev := buf[:n]; len(ev) >= unix.SizeofInotifyEvent; {
			e := (*unix.InotifyEvent)(unsafe.Pointer(&ev[0]))
			end := unix.SizeofInotifyEvent + int(e.Len)
			if end > len(ev) {
				break
			}
			if int(e.Wd) == w.wd {
				if e.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 {
					w.wd = -1 // the kernel dropped the watch
					return true
				}
				if string(bytes.TrimRight(ev[unix.SizeofInotifyEvent:end], "\x00")) == name {
					return true
				}
			}
			ev = ev[end:]
		}
	}
}

// watch points the instance at dir, dropping the watch on any other
// directory, and reports whether it could.
func (w *pathWatch) watch(dir string) bool {
	// Adding a watch on a directory already watched returns its wd again,
	// and a directory recreated under the same name gets a new one.
	wd, err := unix.InotifyAddWatch(w.fd, dir, watchMask)
	if err != nil {
		return false
	}
	if w.wd >= 0 && w.wd != wd {
		unix.InotifyRmWatch(w.fd, uint32(w.wd))
	}
	w.wd = wd
	return true
}

// discardQueued reads and drops the events already queued, without waiting.
func (w *pathWatch) discardQueued() {
	rc, err := w.f.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		var buf [4096]byte
		for {
			if n, err := unix.Read(int(fd), buf[:]); n <= 0 || err != nil {
				return
			}
		}
	})
}

// nearestExisting returns the deepest existing directory on the way to path
// and the name in it that leads to path (path's own base name when its
// directory exists). It returns "" when not even the root can be seen.
func nearestExisting(path string) (dir, name string) {
	name = filepath.Base(path)
	for dir = filepath.Dir(path); ; dir, name = filepath.Dir(dir), filepath.Base(dir) {
		fi, err := os.Stat(dir)
		if err == nil && fi.IsDir() {
			return dir, name
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTDIR) {
			return "", ""
		}
		if parent := filepath.Dir(dir); parent == dir {
			return "", ""
		}
	}
}
