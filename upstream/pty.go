package upstream

import (
	"context"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// PTYUpstream opens a pseudo-terminal, or a symlink to one, that the VMM
// holds the other end of (Cloud Hypervisor --serial pty, QEMU -serial pty,
// socat PTY,link=PATH). Each Dial opens Path anew, so a VMM that comes back
// on a new PTY behind the same symlink is followed.
type PTYUpstream struct {
	Path string
}

func (u *PTYUpstream) String() string { return "pty:" + u.Path }

func (u *PTYUpstream) watchPath() string { return u.Path }

// Dial opens the PTY in raw mode: the console's bytes pass through
// untouched (no echo, no CR/LF translation, no signals from ^C).
func (u *PTYUpstream) Dial(ctx context.Context) (io.ReadWriteCloser, error) {
	// O_NOCTTY: the daemon must not acquire the VM's console as its
	// controlling terminal. O_NONBLOCK: os.File then uses the poller, so a
	// blocked Read ends when the file is closed.
	fd, err := unix.Open(u.Path, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: u.Path, Err: err}
	}
	if err := makeRaw(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("pty %s: %w", u.Path, err)
	}
	return os.NewFile(uintptr(fd), u.Path), nil
}

// makeRaw puts the terminal at fd in raw mode, as cfmakeraw(3) does.
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return fmt.Errorf("not a terminal: %w", err)
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}
