package proxy

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"
	"unsafe"

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

// pathWatch waits for changes on the way to a path. It keeps one inotify
// instance for the life of the upstream loop: closing an instance waits for
// a kernel grace period (19 ms measured here, with strace), so closing one
// after every wait would delay each attach by that much, right between the
// socket appearing and the dial.
type pathWatch struct {
	f  *os.File // nil where inotify is unavailable: waits just sleep
	fd int
	wd int // the current watch, or -1
}

func newPathWatch() *pathWatch {
	w := &pathWatch{wd: -1}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return w
	}
	// Non-blocking, so os.File hands it to the poller: reads park without
	// a thread and honour deadlines.
	w.f, w.fd = os.NewFile(uintptr(fd), "inotify"), fd
	return w
}

// Close releases the inotify instance.
func (w *pathWatch) Close() {
	if w.f != nil {
		w.f.Close()
	}
}

// wait waits up to timeout for a change that may let path be opened: path,
// or the missing directory on the way to it, being created, or path naming
// something other than before (what statPath returned before the last
// attempt). It watches the nearest existing ancestor, so the wait costs no
// CPU and ends within milliseconds of the change; it reports whether such a
// change woke it. Where inotify is unavailable it simply sleeps. It returns
// early when ctx is done.
func (w *pathWatch) wait(ctx context.Context, path string, timeout time.Duration, before pathID) bool {
	deadline := time.Now().Add(timeout)
	path = filepath.Clean(path)
	dir, name := nearestExisting(path)
	if w.f == nil || dir == "" || !w.watch(dir) {
		sleep(ctx, timeout)
		return false
	}
	// Events queued until now describe changes that the comparison with
	// before sees directly; only events after it are news.
	w.discardQueued()
	if d, n := nearestExisting(path); d != dir || n != name || statPath(path) != before {
		return true
	}
	w.f.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { w.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, 4096)
	for {
		n, err := w.f.Read(buf)
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
