// Package unixsock creates the Unix sockets that consoleproxy serves (the
// client sockets, a listen: upstream, the status socket) and checks who
// connects to them.
//
// A socket is created with its mode and group in effect before its path
// becomes visible, replaces only a stale socket, and is removed at Close
// only while the path still names it. Peers are told apart by the
// credentials the kernel records at connect (SO_PEERCRED), which a client
// cannot forge. The package starts no goroutine and does no logging.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// MaxSocketPath is the longest Unix socket path the kernel accepts: the size
// of sun_path less its terminating NUL.
const MaxSocketPath = 107

// CheckSocketPath reports whether path can name a Unix socket: not empty and
// no longer than MaxSocketPath bytes.
func CheckSocketPath(path string) error {
	switch {
	case path == "":
		return errors.New("empty socket path")
	case len(path) > MaxSocketPath:
		return fmt.Errorf("socket path %s is %d bytes, longer than the system limit of %d", path, len(path), MaxSocketPath)
	}
	return nil
}

// DefaultSocketMode is the mode of sockets created by Listen when
// SocketOptions.Mode is zero: only the proxy's own user may connect.
const DefaultSocketMode os.FileMode = 0o600

// Errors from Listen about what is already at the path.
var (
	ErrSocketInUse = errors.New("a live process is listening on it")
	ErrNotSocket   = errors.New("it exists and is not a socket; not removing it")
)

// SocketOptions configures sockets created by Listen. Zero fields mean the
// documented defaults.
type SocketOptions struct {
	// Mode is the socket file's permission bits. Zero means
	// DefaultSocketMode.
	Mode os.FileMode
	// Group, when not empty, is the group name or numeric gid given to the
	// socket file.
	Group string
}

// SocketListener is a Unix socket listener created by Listen. Its Close
// removes the socket file, but only while the path still names the socket it
// created: a file another process put there since is left alone.
type SocketListener struct {
	*net.UnixListener
	path     string
	dev, ino uint64
}

// Addr returns the socket's path.
func (l *SocketListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Accept waits for the next connection. Its errors name the socket's path,
// not the private one it was bound at.
func (l *SocketListener) Accept() (net.Conn, error) {
	c, err := l.UnixListener.Accept()
	if oe, ok := err.(*net.OpError); ok {
		oe.Addr = l.Addr()
	}
	return c, err
}

// Ours reports whether the socket's path still names the socket that
// Listen created.
func (l *SocketListener) Ours() bool {
	var st unix.Stat_t
	return unix.Lstat(l.path, &st) == nil && st.Dev == l.dev && st.Ino == l.ino
}

// Names reports whether path, following symlinks, names this socket: a
// hard link or another spelling of its path. Once the socket's own path no
// longer names it, nothing does: its inode number may already be another
// file's.
func (l *SocketListener) Names(path string) bool {
	var st unix.Stat_t
	return l.Ours() && unix.Stat(path, &st) == nil && st.Dev == l.dev && st.Ino == l.ino
}

// Close stops listening and removes the socket file if it is still ours.
func (l *SocketListener) Close() error {
	err := l.UnixListener.Close()
	if l.Ours() {
		if rmErr := os.Remove(l.path); rmErr != nil {
			err = errors.Join(err, fmt.Errorf("remove socket: %w", rmErr))
		}
	}
	return err
}

// LookupGroup resolves a group name or numeric gid.
func LookupGroup(group string) (int, error) {
	if gid, err := strconv.Atoi(group); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, fmt.Errorf("socket group %s: %w", group, err)
	}
	return strconv.Atoi(g.Gid)
}

// Listen creates a Unix socket at path whose mode and group are in effect
// before the path becomes visible, so that there is no moment in which
// anyone the operator did not allow can connect.
//
// The socket is bound inside a fresh private directory (mode 0700) next to
// path, given its mode and group there, and renamed into place. Binding goes
// through /proc/self/fd when the temporary path would exceed the kernel's
// limit, so a path close to MaxSocketPath still works. An existing socket at
// path that nobody listens on is replaced; a live one (ErrSocketInUse), one
// whose state cannot be told, or anything that is not a socket
// (ErrNotSocket) makes Listen fail and is left untouched.
func Listen(path string, opts SocketOptions) (*SocketListener, error) {
	if err := CheckSocketPath(path); err != nil {
		return nil, err
	}
	mode := opts.Mode
	if mode == 0 {
		mode = DefaultSocketMode
	}
	gid := -1
	if opts.Group != "" {
		var err error
		if gid, err = LookupGroup(opts.Group); err != nil {
			return nil, err
		}
	}
	if err := clearStaleSocket(path); err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	tmp, err := os.MkdirTemp(dir, ".consoleproxy-")
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	defer os.RemoveAll(tmp)

	ln, err := bindPrivate(tmp)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	tmpSock := filepath.Join(tmp, "s")
	if err := setModeAndGroup(tmpSock, mode, gid); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	// RENAME_NOREPLACE: if anything appeared at path since the check, fail
	// rather than replace it.
	if err := unix.Renameat2(unix.AT_FDCWD, tmpSock, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
		ln.Close()
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("socket %s: %w", path, ErrNotSocket)
		}
		return nil, fmt.Errorf("socket %s: rename into place: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return &SocketListener{UnixListener: ln, path: path, dev: st.Dev, ino: st.Ino}, nil
}

// bindPrivate binds a listening socket named "s" inside dir.
func bindPrivate(dir string) (*net.UnixListener, error) {
	name := filepath.Join(dir, "s")
	if len(name) <= MaxSocketPath {
		return net.ListenUnix("unix", &net.UnixAddr{Name: name, Net: "unix"})
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return net.ListenUnix("unix", &net.UnixAddr{Name: fmt.Sprintf("/proc/self/fd/%d/s", d.Fd()), Net: "unix"})
}

func setModeAndGroup(path string, mode os.FileMode, gid int) error {
	if gid >= 0 {
		if err := os.Lchown(path, -1, gid); err != nil {
			return fmt.Errorf("set group: %w", err)
		}
	}
	if err := os.Chmod(path, mode.Perm()); err != nil {
		return fmt.Errorf("set mode: %w", err)
	}
	return nil
}

// staleProbeTimeout bounds the connect that tells a stale socket from a
// live one.
const staleProbeTimeout = time.Second

// clearStaleSocket makes path free for a new socket: nothing there, or a
// socket nobody listens on, which it removes. Anything else is an error and
// is left alone.
func clearStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return ErrNotSocket
	}
	conn, err := net.DialTimeout("unix", path, staleProbeTimeout)
	switch {
	case err == nil:
		conn.Close()
		return ErrSocketInUse
	case errors.Is(err, syscall.ECONNREFUSED):
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale socket: %w", err)
		}
		return nil
	case errors.Is(err, syscall.ENOENT):
		return nil
	case errors.Is(err, syscall.EAGAIN):
		return ErrSocketInUse // backlog full: someone is listening
	}
	return fmt.Errorf("cannot tell whether a process listens on it: %w", err)
}

// PeerCred returns the credentials of the process at the other end of a
// Unix socket connection, as the kernel recorded them at connect
// (SO_PEERCRED): pid -1 and uid and gid 2^32-1 when the connection cannot
// say.
func PeerCred(conn net.Conn) unix.Ucred {
	cred := unix.Ucred{Pid: -1, Uid: ^uint32(0), Gid: ^uint32(0)}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return cred
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return cred
	}
	raw.Control(func(fd uintptr) {
		if uc, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			cred = *uc
		}
	})
	return cred
}
