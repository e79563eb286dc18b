// Package logsink writes the console log: an append-only file rotated by
// size, which tail -F and log shippers can follow.
//
// A Log is written by one producer (package proxy's log writer, itself a
// reader of the console ring) and reopened from a signal handler; it starts
// no goroutine and does no buffering of its own, so what Write returns is on
// its way to the disk. It assumes it is the only writer of its files, and
// follows what others do to them: a truncation (logrotate's copytruncate) is
// followed, never undone; a deletion is noticed within a second of writing
// and the file created again, the loss reported through a LossError; a FIFO
// or anything else that is not a regular file is refused without blocking on
// it.
//
// Rotation cuts the stream at a line boundary when one is near the size
// limit, renames PATH to PATH.1 (and PATH.1 to PATH.2, …), and starts a new
// PATH, so that concatenating PATH.N … PATH.1 PATH gives the console output
// with no duplicate and no gap.
package logsink

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// FileMode is the mode of a console log the Log creates, set explicitly
// whatever the umask: the console may show secrets, so only the owner
// writes and only its group reads.
const FileMode = 0o640

// CutWindow is how far before the size limit a rotation looks for a newline
// to cut after.
const CutWindow = 4096

// TimestampLen is the length of the prefix Options.Timestamps adds to each
// line: an RFC 3339 UTC time with milliseconds and a space.
const TimestampLen = len(timestampLayout) + 1

const timestampLayout = "2006-01-02T15:04:05.000Z"

// lookInterval is how often, at most, a Log that is being written looks at
// its file (one fstat(2)) to find a deletion or a truncation by others. A
// Log that is not written never looks.
const lookInterval = time.Second

// ErrSymlink is returned when the log path is a symbolic link: following it
// would let whoever controls the link choose which file the proxy appends to.
var ErrSymlink = errors.New("is a symbolic link; refusing to follow it")

// ErrNotRegular is returned when the log path (or PATH.1, when read for
// seeding) is not a regular file: a FIFO, a socket, a device, a directory.
// It is found without opening the path in a way that blocks.
var ErrNotRegular = errors.New("not a regular file")

// ErrDeleted is what a LossError unwraps to: the log file was deleted from
// under the Log (by itself, or with its directory).
var ErrDeleted = errors.New("log file was deleted")

// LossError is returned by Write when console output the Log had accepted
// earlier is gone with a file deleted from under it. It reports a loss, not
// a failure: when Write returns it, PATH has been created again and p[n:] can
// be written again at once.
type LossError struct {
	Path string
	// Bytes counts the console bytes (not timestamps) written to the file
	// since the Log last saw it linked; they may have gone in before the
	// deletion, but they are gone with it. It may be zero: the file was
	// deleted while nothing was written.
	Bytes uint64
}

func (e *LossError) Error() string {
	return fmt.Sprintf("console log %s: %v; created it again (%d bytes written since it was last seen are lost)", e.Path, ErrDeleted, e.Bytes)
}

// Unwrap returns ErrDeleted.
func (e *LossError) Unwrap() error { return ErrDeleted }

// Unlogged returns the console bytes lost and the reason, as the console
// log's loss notice gives it. Package proxy's log writer looks for this
// method on a Write error.
func (e *LossError) Unlogged() (n uint64, reason string) { return e.Bytes, "log file deleted" }

// Options configures a Log. The zero value never rotates and adds no
// timestamps.
type Options struct {
	// MaxSize is the size at which the file is rotated, in file bytes
	// (timestamps included). Zero never rotates.
	MaxSize int64
	// MaxFiles is how many rotated files are kept: PATH.1 (newest) to
	// PATH.MaxFiles. Zero keeps none: a rotation starts PATH anew.
	MaxFiles int
	// Timestamps prefixes every line with the time its first byte was
	// written.
	Timestamps bool
	// Now returns the current time, for timestamps and for spacing the
	// Log's looks at its file; nil means time.Now. For tests.
	Now func() time.Time
	// Seam, when set, stands between the Log and its open file for every
	// write. For fault-injection tests; nil means the file itself.
	Seam func(f *os.File) io.Writer
}

// Log is an open console log. Its methods are safe for concurrent use.
type Log struct {
	path string
	opts Options

	mu          sync.Mutex
	closed      bool
	f           *os.File
	size        int64  // bytes in f, as of the last write or look
	atLineStart bool   // the file ends with a newline, or is empty
	render      []byte // reused for the bytes of one Write

	// What others did to the file is learned by looking at it (fstat):
	// when a write would rotate, after a failed write, when rotating, and
	// at most every lookInterval while writing.
	lastLook  time.Time
	sinceLook uint64 // console bytes written since the last look found f linked
	deleted   bool   // a deletion was found and not reported yet
	lost      uint64 // console bytes lost to deletions, not reported yet
}

// Open opens or creates the log at path for appending. It refuses a
// symbolic link (ErrSymlink) and anything that is not a regular file
// (ErrNotRegular), without opening it in a way that blocks.
func Open(path string, opts Options) (*Log, error) {
	if opts.MaxSize < 0 || opts.MaxFiles < 0 {
		return nil, fmt.Errorf("console log %s: negative size or file count", path)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	l := &Log{path: path, opts: opts}
	if err := l.openLocked(); err != nil {
		return nil, err
	}
	return l, nil
}

// openFlags opens the log for appending. It is read-write only so that
// the file's last byte can be read from the same descriptor.
const openFlags = os.O_RDWR | os.O_APPEND | unix.O_NOFOLLOW | unix.O_CLOEXEC

// createLog creates a new log file at path with FileMode set explicitly,
// whatever the umask; it fails if path exists.
func createLog(path string) (*os.File, error) {
	f, err := os.OpenFile(path, openFlags|os.O_CREATE|os.O_EXCL, FileMode)
	if err != nil {
		return nil, err
	}
	if err := f.Chmod(FileMode); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// openLocked opens or creates l.path and makes it the current file.
func (l *Log) openLocked() error {
	f, err := createLog(l.path)
	if errors.Is(err, os.ErrExist) {
		f, err = openRegular(l.path, openFlags)
	} else if err != nil {
		err = fmt.Errorf("console log: %w", err)
	}
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("console log %s: %w", l.path, err)
	}
	l.f = f
	if err := l.followSizeLocked(fi.Size()); err != nil {
		l.f = nil
		f.Close()
		return err
	}
	l.lastLook, l.sinceLook = l.opts.Now(), 0
	return nil
}

// followSizeLocked makes size the file's size as far as the Log knows, and
// learns from the file whether it ends a line.
func (l *Log) followSizeLocked(size int64) error {
	l.size, l.atLineStart = size, true
	if size == 0 {
		return nil
	}
	var last [1]byte
	_, err := l.f.ReadAt(last[:], size-1)
	switch {
	case err == nil:
		l.atLineStart = last[0] == '\n'
	case errors.Is(err, io.EOF):
		// Truncated again since size was read: the next look learns how
		// far. Until then a line start is the likelier guess.
	default:
		return fmt.Errorf("console log %s: %w", l.path, err)
	}
	return nil
}

// lookLocked looks at the open file (one fstat) to follow what others did
// to it. A truncation (logrotate's copytruncate) makes the file's real size
// the Log's, so that the next rotation counts from it. A deletion (no link
// left) counts what was written since the last look as lost, to be reported
// by the next Write, and creates PATH again; if that fails (the directory is
// gone too) the Log is left without a file, as after a failed rotation, and
// the error returned.
func (l *Log) lookLocked() error {
	l.lastLook = l.opts.Now()
	fi, err := l.f.Stat()
	if err != nil {
		return fmt.Errorf("console log %s: %w", l.path, err)
	}
	if !linked(fi) {
		l.deleted, l.lost, l.sinceLook = true, l.lost+l.sinceLook, 0
		// The old file's bytes are counted lost whatever its close says.
		l.f.Close()
		l.f = nil
		return l.openLocked()
	}
	l.sinceLook = 0
	if fi.Size() != l.size {
		return l.followSizeLocked(fi.Size())
	}
	return nil
}

// linked reports whether the file fi describes still has a name.
func linked(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return !ok || st.Nlink > 0
}

// takeLossLocked returns the deletion found and not reported yet as a
// *LossError, once, or nil.
func (l *Log) takeLossLocked() error {
	if !l.deleted {
		return nil
	}
	err := &LossError{Path: l.path, Bytes: l.lost}
	l.deleted, l.lost = false, 0
	return err
}

// Write appends console output, adding timestamps and rotating as
// configured. It returns how many bytes of p are in the log. A failed write
// leaves the file as it was before that write (it is truncated back), so
// the bytes of p from n on can simply be written again. A *LossError is not
// a failure: it reports output lost with a deleted file, found before
// p[n:] was written; PATH has been created again.
func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0, os.ErrClosed
	}
	if l.f == nil {
		// A rotation, reopen or re-creation failed earlier: try again.
		if err := l.openLocked(); err != nil {
			return 0, err
		}
	}
	now := l.opts.Now()
	if now.Sub(l.lastLook) >= lookInterval || now.Before(l.lastLook) {
		if err := l.lookLocked(); err != nil {
			return 0, err
		}
	}
	if err := l.takeLossLocked(); err != nil {
		return 0, err
	}
	out, stamps := l.renderLocked(p, now)
	if l.opts.MaxSize > 0 && l.size+int64(len(out)) > l.opts.MaxSize {
		// This write would rotate the file: the decision must count from
		// the file's real size, which a copytruncate may have cut. The
		// check costs one fstat per rotation (or per truncation found),
		// not one per write.
		wasAtLineStart := l.atLineStart
		if err := l.lookLocked(); err != nil {
			return 0, err
		}
		if err := l.takeLossLocked(); err != nil {
			return 0, err
		}
		if l.atLineStart != wasAtLineStart {
			out, stamps = l.renderLocked(p, now)
		}
	}
	written := 0 // console bytes of p in the file
	for len(out) > 0 {
		seg, rotate := l.cutLocked(out)
		if seg > 0 {
			if err := l.appendLocked(out[:seg]); err != nil {
				return written, err
			}
			// A segment ends at a newline or mid-line, never inside a
			// timestamp, so its console bytes are its length less the
			// timestamps that start in it.
			n := 0
			for len(stamps) > 0 && stamps[0] < seg {
				stamps = stamps[1:]
				n++
			}
			written += seg - n*TimestampLen
			l.sinceLook += uint64(seg - n*TimestampLen)
			for i := range stamps {
				stamps[i] -= seg
			}
			out = out[seg:]
		}
		if rotate {
			if err := l.rotateLocked(); err != nil {
				return written, err
			}
			// The rotation found the file deleted: report it before
			// writing into the new one.
			if err := l.takeLossLocked(); err != nil {
				return written, err
			}
		}
	}
	return written, nil
}

// renderLocked returns p as file bytes, with a timestamp (of now) at every
// line start when configured, and where each timestamp starts.
func (l *Log) renderLocked(p []byte, now time.Time) (out []byte, stamps []int) {
	if !l.opts.Timestamps {
		return p, nil
	}
	// AppendFormat may outgrow a fixed array while formatting the fraction,
	// so keep what it returns.
	var arr [TimestampLen + 8]byte
	ts := append(now.UTC().AppendFormat(arr[:0], timestampLayout), ' ')
	out = l.render[:0]
	atStart := l.atLineStart
	for len(p) > 0 {
		if atStart {
			stamps = append(stamps, len(out))
			out = append(out, ts...)
		}
		line := p
		if i := bytes.IndexByte(p, '\n'); i >= 0 {
			line = p[:i+1]
		}
		out = append(out, line...)
		p = p[len(line):]
		atStart = line[len(line)-1] == '\n'
	}
	l.render = out
	return out, stamps
}

// cutLocked decides how many bytes of out go into the current file and
// whether the file is rotated after them.
func (l *Log) cutLocked(out []byte) (seg int, rotate bool) {
	max := l.opts.MaxSize
	if max == 0 {
		return len(out), false
	}
	room := max - l.size
	if room >= int64(len(out)) {
		return len(out), false
	}
	if room <= 0 {
		return 0, true
	}
	// The last newline within CutWindow before the limit: first in what is
	// being written, else the file's own end.
	window := out[:room]
	if i := bytes.LastIndexByte(window, '\n'); i >= 0 && l.size+int64(i)+1 >= max-CutWindow {
		return i + 1, true
	}
	if l.atLineStart && l.size > 0 && l.size >= max-CutWindow {
		return 0, true
	}
	return int(room), true
}

// appendLocked writes b whole or, on failure, truncates the file back to
// where it was, so that a failed write leaves no partial bytes behind.
func (l *Log) appendLocked(b []byte) error {
	var w io.Writer = l.f
	if l.opts.Seam != nil {
		w = l.opts.Seam(l.f)
	}
	n, err := w.Write(b)
	if err == nil {
		l.size += int64(n)
		l.atLineStart = b[len(b)-1] == '\n'
		return nil
	}
	if n > 0 {
		l.takeBackLocked(n)
	}
	return fmt.Errorf("write console log %s: %w", l.path, err)
}

// takeBackLocked removes the n bytes a failed write left at the end of the
// file. The end is asked of the file, not taken from l.size: O_APPEND put
// them at the real end, which an external truncation (logrotate's
// copytruncate) may have moved below l.size, and truncating to the stale
// size would extend the file with NULs. What remains is a window of
// microseconds between the fstat and the ftruncate in which a truncation by
// others would still be undone.
func (l *Log) takeBackLocked(n int) {
	fi, err := l.f.Stat()
	if err != nil {
		// Nothing known to truncate to: better a partial write in the log
		// than a hole. The next look learns the size.
		return
	}
	end := max(0, fi.Size()-int64(n))
	if err := l.f.Truncate(end); err != nil {
		// The file holds a partial write we could not take back.
		end = fi.Size()
	}
	// A failed read of the last byte leaves the line-start guess: it only
	// decides whether the next byte gets a timestamp.
	l.followSizeLocked(end)
}

// rotateLocked moves PATH to PATH.1 (shifting older files up and dropping
// the oldest) and starts a new PATH. PATH never stops existing: the new file
// is created under a temporary name and renamed over PATH after the old one
// was linked to PATH.1, so a follower (tail -F, a log shipper) sees one
// replacement and never a missing file.
func (l *Log) rotateLocked() error {
	// A file deleted from under the Log is not rotated into PATH.1: what was
	// written to it since the last look is lost, and PATH starts anew.
	deleted := false
	if fi, err := l.f.Stat(); err == nil && !linked(fi) {
		deleted = true
		l.deleted, l.lost, l.sinceLook = true, l.lost+l.sinceLook, 0
	}
	if err := l.f.Close(); err != nil && !deleted {
		l.f = nil
		return fmt.Errorf("close console log %s: %w", l.path, err)
	}
	l.f = nil
	// PATH and PATH.1 already one file: an earlier rotation linked them and
	// then failed (or the process died) before the new PATH. Finish that
	// rotation rather than shift the same bytes into a second file.
	if !deleted && l.opts.MaxFiles > 0 && !sameFile(l.path, l.rotated(1)) {
		// Files beyond MaxFiles (left by a larger setting) go first.
		for k := l.opts.MaxFiles + 1; ; k++ {
			if err := os.Remove(l.rotated(k)); err != nil {
				break
			}
		}
		for k := l.opts.MaxFiles - 1; k >= 1; k-- {
			if err := os.Rename(l.rotated(k), l.rotated(k+1)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("rotate console log: %w", err)
			}
		}
		os.Remove(l.rotated(1)) // only there when MaxFiles is 1
		if err := os.Link(l.path, l.rotated(1)); err != nil {
			// No hard links here: fall back to a rename, which leaves PATH
			// missing until it is created again below.
			if err := os.Rename(l.path, l.rotated(1)); err != nil {
				return fmt.Errorf("rotate console log: %w", err)
			}
		}
	}
	tmp := l.path + ".new"
	f, err := createLog(tmp)
	if errors.Is(err, os.ErrExist) {
		// Left by a crash mid-rotation: ours to replace.
		os.Remove(tmp)
		f, err = createLog(tmp)
	}
	if err != nil {
		return fmt.Errorf("rotate console log: %w", err)
	}
	if err := os.Rename(tmp, l.path); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("rotate console log: %w", err)
	}
	// The file just created is now PATH: keep its descriptor.
	l.f, l.size, l.atLineStart = f, 0, true
	l.lastLook, l.sinceLook = l.opts.Now(), 0
	return nil
}

func (l *Log) rotated(k int) string { return l.path + "." + strconv.Itoa(k) }

// sameFile reports whether a and b name the same file.
func sameFile(a, b string) bool {
	fa, errA := os.Lstat(a)
	fb, errB := os.Lstat(b)
	return errA == nil && errB == nil && os.SameFile(fa, fb)
}

// Reopen closes the file and opens PATH again, for an external rotation
// (logrotate's create mode followed by SIGHUP). Bytes written before Reopen
// are in the old file; bytes after it in the new one.
func (l *Log) Reopen() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return os.ErrClosed
	}
	var closeErr error
	if l.f != nil {
		// A file deleted meanwhile (rather than renamed, as logrotate's
		// create mode does) took what was written since the last look.
		if fi, err := l.f.Stat(); err == nil && !linked(fi) {
			l.deleted, l.lost, l.sinceLook = true, l.lost+l.sinceLook, 0
		}
		closeErr = l.f.Close()
		l.f = nil
	}
	if err := l.openLocked(); err != nil {
		return errors.Join(closeErr, err)
	}
	return closeErr
}

// Close closes the file. It is safe to call more than once.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("close console log %s: %w", l.path, err)
	}
	return nil
}
