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

// waitForPath waits up to timeout for a change that may let path be opened:
// path, or the missing directory on the way to it, being created, or path
// naming something other than before (what statPath returned before the
// last attempt). It watches the nearest existing ancestor with inotify, so
// the wait costs no CPU and ends within milliseconds of the change; it
// reports whether such a change woke it. Where inotify is unavailable it
// simply sleeps. It returns early when ctx is done.
func waitForPath(ctx context.Context, path string, timeout time.Duration, before pathID) bool {
	deadline := time.Now().Add(timeout)
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		sleep(ctx, timeout)
		return false
	}
	// Non-blocking, so os.File hands it to the poller: reads park without
	// a thread and honour deadlines.
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close()
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()

	path = filepath.Clean(path)
	dir, name := nearestExisting(path)
	if dir == "" {
		sleep(ctx, timeout)
		return false
	}
	if _, err := unix.InotifyAddWatch(fd, dir, watchMask); err != nil {
		sleep(ctx, timeout)
		return false
	}
	// A change between the last attempt and the watch would raise no
	// event: look for one now.
	if d, n := nearestExisting(path); d != dir || n != name || statPath(path) != before {
		return true
	}
	f.SetReadDeadline(deadline)
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
			evName := string(bytes.TrimRight(ev[unix.SizeofInotifyEvent:end], "\x00"))
			if e.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 || evName == name {
				return true
			}
			ev = ev[end:]
		}
	}
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
