package logsink

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// openRegular opens the existing file at path with flags (O_NOFOLLOW and
// O_CLOEXEC added), refusing anything but a regular file without opening
// it in a way that could block: open(2) of a FIFO waits for a peer, and a
// device may do anything when opened. The type is read with lstat(2)
// first; the open itself is non-blocking, and the descriptor's type checked
// again, in case something else took path's place in between. The
// descriptor returned is in blocking mode, as a regular file's always is in
// effect. Errors name path; a missing file gives an error that is
// os.ErrNotExist.
func openRegular(path string, flags int) (*os.File, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return nil, fmt.Errorf("console log: %w", &os.PathError{Op: "lstat", Path: path, Err: err})
	}
	if err := checkRegular(path, st.Mode); err != nil {
		return nil, err
	}
	fd, err := unix.Open(path, flags|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("console log %s %w", path, ErrSymlink)
	}
	if err != nil {
		return nil, fmt.Errorf("console log: %w", &os.PathError{Op: "open", Path: path, Err: err})
	}
	err = unix.Fstat(fd, &st)
	if err == nil {
		err = checkRegular(path, st.Mode)
	} else {
		err = fmt.Errorf("console log: %w", &os.PathError{Op: "fstat", Path: path, Err: err})
	}
	if err == nil {
		if serr := unix.SetNonblock(fd, false); serr != nil {
			err = fmt.Errorf("console log: %w", &os.PathError{Op: "fcntl", Path: path, Err: serr})
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// checkRegular returns nil when mode (a stat(2) st_mode) is a regular
// file's, and otherwise an error that names path and what is there.
func checkRegular(path string, mode uint32) error {
	var kind string
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return nil
	case unix.S_IFLNK:
		return fmt.Errorf("console log %s %w", path, ErrSymlink)
	case unix.S_IFIFO:
		kind = "a FIFO"
	case unix.S_IFSOCK:
		kind = "a socket"
	case unix.S_IFDIR:
		kind = "a directory"
	case unix.S_IFCHR:
		kind = "a character device"
	case unix.S_IFBLK:
		kind = "a block device"
	default:
		kind = fmt.Sprintf("file type %#o", mode&unix.S_IFMT)
	}
	return fmt.Errorf("console log %s: %w (%s)", path, ErrNotRegular, kind)
}
