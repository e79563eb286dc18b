// Package watch shares one inotify instance among every watch of a
// process: the console upstreams waiting for their sockets and the
// discovery of consoles in host mode.
//
// The kernel allows each user 128 inotify instances by default, so a
// process serving a thousand consoles cannot have one per console; watches
// are counted separately (max_user_watches) and are cheap. A Watcher opens
// its instance when the first watch or hold needs it and closes it when the
// last one ends, so a process that is connected to everything holds none.
//
// Watch callbacks run on the Watcher's one reading goroutine and must not
// block: they signal a channel and return. The package does no logging.
package watch

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mask is what any watcher of a directory may want to hear of: names
// created, moved in or out, deleted, or changed in mode; and the directory
// itself going away.
const mask = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_DELETE | unix.IN_ATTRIB |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// Event is a change in a watched directory.
type Event struct {
	// Name is the entry that changed; empty for the events below.
	Name string
	// Gone: the directory itself was removed or moved away. The watch has
	// ended; no further events come for it.
	Gone bool
	// Overflow: the kernel's queue overflowed and events were lost; the
	// watcher should look at what it watches afresh.
	Overflow bool
}

// ErrClosed is returned after Close.
var ErrClosed = errors.New("watcher closed")

// Watcher is one inotify instance, opened on demand, shared by any number
// of watches. Its methods are safe for concurrent use.
type Watcher struct {
	mu     sync.Mutex
	inst   *instance // nil while nothing needs one
	refs   int       // holds and watches on inst
	closed bool
	ended  sync.WaitGroup // readers and background closes
}

// instance is one inotify descriptor and the directories watched on it.
type instance struct {
	f    *os.File
	fd   int
	dirs map[int]*dir // by watch descriptor
}

type dir struct {
	wd   int
	subs map[*sub]struct{}
}

type sub struct{ fn func(Event) }

// New returns a Watcher; it opens nothing until it is used.
func New() *Watcher { return &Watcher{} }

// acquireLocked opens the instance if there is none and takes a reference.
func (w *Watcher) acquireLocked() (*instance, error) {
	if w.closed {
		return nil, ErrClosed
	}
	if w.inst == nil {
		fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("inotify: %w", err)
		}
		// Non-blocking, so os.File hands it to the poller: the reader
		// parks without a thread, and Close ends its read.
		inst := &instance{f: os.NewFile(uintptr(fd), "inotify"), fd: fd, dirs: make(map[int]*dir)}
		w.inst = inst
		w.ended.Go(func() { w.read(inst) })
	}
	w.refs++
	return w.inst, nil
}

// releaseLocked drops a reference; the last one closes the instance. The
// close runs in the background: it waits for a kernel grace period, which
// must not hold up the caller (a connection that just came up).
func (w *Watcher) releaseLocked() {
	w.refs--
	if w.refs > 0 || w.inst == nil {
		return
	}
	f := w.inst.f
	w.inst = nil
	w.ended.Go(func() { f.Close() })
}

// Hold keeps the instance open until release is called, so that watches
// made and ended one after another (a wait, a retry, a wait) reuse one
// instance instead of paying for a new one each time. release may be
// called once.
func (w *Watcher) Hold() (release func(), err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.acquireLocked(); err != nil {
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			w.mu.Lock()
			if !w.closed {
				w.releaseLocked()
			}
			w.mu.Unlock()
		})
	}, nil
}

// Watch calls fn for every change in the directory at path until cancel is
// called or an Event with Gone is delivered. fn runs on the Watcher's
// reading goroutine and must not block. Changes made before Watch returns
// may or may not be reported: look at the directory after Watch returns.
// cancel may be called more than once.
func (w *Watcher) Watch(path string, fn func(Event)) (cancel func(), err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	inst, err := w.acquireLocked()
	if err != nil {
		return nil, err
	}
	// Adding a watch on a directory already watched returns its wd again.
	wd, err := unix.InotifyAddWatch(inst.fd, path, mask)
	if err != nil {
		w.releaseLocked()
		return nil, fmt.Errorf("watch %s: %w", path, err)
	}
	d := inst.dirs[wd]
	if d == nil {
		d = &dir{wd: wd, subs: make(map[*sub]struct{})}
		inst.dirs[wd] = d
	}
	s := &sub{fn: fn}
	d.subs[s] = struct{}{}
	var once sync.Once
	return func() {
		once.Do(func() {
			w.mu.Lock()
			defer w.mu.Unlock()
			if w.closed {
				return
			}
			if _, ok := d.subs[s]; !ok {
				w.releaseLocked() // the directory went, and the watch with it
				return
			}
			delete(d.subs, s)
			if len(d.subs) == 0 && inst.dirs[wd] == d {
				delete(inst.dirs, wd)
				unix.InotifyRmWatch(inst.fd, uint32(wd))
			}
			w.releaseLocked()
		})
	}, nil
}

// read dispatches inst's events until inst is closed.
func (w *Watcher) read(inst *instance) {
	buf := make([]byte, 64<<10)
	for {
		n, err := inst.f.Read(buf)
		if err != nil {
			return // closed
		}
		for ev := buf[:n]; len(ev) >= unix.SizeofInotifyEvent; {
			e := (*unix.InotifyEvent)(unsafe.Pointer(&ev[0]))
			end := unix.SizeofInotifyEvent + int(e.Len)
			if end > len(ev) {
				break
			}
			name := string(bytes.TrimRight(ev[unix.SizeofInotifyEvent:end], "\x00"))
			w.dispatch(inst, int(e.Wd), e.Mask, name)
			ev = ev[end:]
		}
	}
}

func (w *Watcher) dispatch(inst *instance, wd int, m uint32, name string) {
	var fns []func(Event)
	var event Event
	w.mu.Lock()
	switch {
	case m&unix.IN_Q_OVERFLOW != 0:
		event = Event{Overflow: true}
		for _, d := range inst.dirs {
			for s := range d.subs {
				fns = append(fns, s.fn)
			}
		}
	case m&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0:
		// The path no longer names this directory. A moved directory
		// keeps its watch in the kernel: drop it, so the path can be
		// watched again when it is created anew.
		event = Event{Gone: true}
		if d := inst.dirs[wd]; d != nil {
			delete(inst.dirs, wd)
			if m&unix.IN_IGNORED == 0 {
				unix.InotifyRmWatch(inst.fd, uint32(wd))
			}
			for s := range d.subs {
				fns = append(fns, s.fn)
			}
			clear(d.subs)
		}
	default:
		event = Event{Name: name}
		if d := inst.dirs[wd]; d != nil {
			for s := range d.subs {
				fns = append(fns, s.fn)
			}
		}
	}
	w.mu.Unlock()
	for _, fn := range fns {
		fn(event)
	}
}

// Close ends every watch and hold, closes the instance and returns once
// its reading goroutine has ended. Later calls return ErrClosed.
func (w *Watcher) Close() error {
	w.mu.Lock()
	w.closed = true
	if inst := w.inst; inst != nil {
		w.inst = nil
		w.refs = 0
		w.ended.Go(func() { inst.f.Close() })
	}
	w.mu.Unlock()
	w.ended.Wait()
	return nil
}

// Instances returns how many inotify instances the Watcher holds now: 0
// or 1.
func (w *Watcher) Instances() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.inst == nil {
		return 0
	}
	return 1
}

// NearestDir returns path if it is a directory, else its deepest existing
// ancestor, with next, the entry of that ancestor on the way to path (""
// when dir is path itself). A watch on dir sees what must happen next for
// path to exist. dir is "" when not even the root can be seen.
func NearestDir(path string) (dir, next string) {
	for dir = filepath.Clean(path); ; dir, next = filepath.Dir(dir), filepath.Base(dir) {
		fi, err := os.Stat(dir)
		if err == nil && fi.IsDir() {
			return dir, next
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTDIR) {
			return "", ""
		}
		if filepath.Dir(dir) == dir {
			return "", ""
		}
	}
}
