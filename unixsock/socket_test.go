package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func statSock(t *testing.T, path string) (os.FileMode, uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		t.Fatalf("%s is not a socket", path)
	}
	return os.FileMode(st.Mode & 0o777), st.Gid
}

func TestListenModeAndGroup(t *testing.T) {
	dir := t.TempDir()
	ln, err := Listen(filepath.Join(dir, "a.sock"), SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if mode, _ := statSock(t, filepath.Join(dir, "a.sock")); mode != 0o600 {
		t.Errorf("default mode %v, want 0600", mode)
	}

	g, err := user.LookupGroup("nogroup")
	if err != nil {
		t.Skipf("no nogroup group here: %v", err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	for _, group := range []string{"nogroup", g.Gid} {
		path := filepath.Join(dir, "b"+group+".sock")
		ln, err := Listen(path, SocketOptions{Mode: 0o660, Group: group})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if mode, got := statSock(t, path); mode != 0o660 || got != uint32(gid) {
			t.Errorf("group %s: mode %v gid %d, want 0660 and %d", group, mode, got, gid)
		}
	}
	if _, err := Listen(filepath.Join(dir, "c.sock"), SocketOptions{Group: "no-such-group-here"}); err == nil {
		t.Error("an unknown group was accepted")
	}
}

func TestListenNeverShowsAWiderMode(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.sock")
	var (
		stop     atomic.Bool
		seen     atomic.Int64
		bad      atomic.Value
		watching sync.WaitGroup
	)
	watching.Go(func() {
		for !stop.Load() {
			var st unix.Stat_t
			if unix.Lstat(path, &st) != nil {
				continue
			}
			seen.Add(1)
			if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Mode&0o777 != 0o640 {
				bad.Store(st.Mode)
			}
		}
	})
	// Until the watcher has seen the socket often enough to mean something;
	// a loaded machine may starve it for a while.
	for i := 0; i < 100 || (seen.Load() < 20 && i < 100_000); i++ {
		ln, err := Listen(path, SocketOptions{Mode: 0o640})
		if err != nil {
			t.Fatal(err)
		}
		ln.Close()
	}
	stop.Store(true)
	watching.Wait()
	if m := bad.Load(); m != nil {
		t.Fatalf("the watcher saw the socket path with mode %o", m)
	}
	if seen.Load() == 0 {
		t.Fatal("the watcher never saw the socket: the test proves nothing")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 0 {
		t.Errorf("left behind: %v", entries)
	}
}

func TestListenExistingPaths(t *testing.T) {
	dir := t.TempDir()

	// A stale socket (nobody listening) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	ln, err := Listen(stale, SocketOptions{})
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	defer ln.Close()

	// A live one is refused and keeps serving.
	if _, err := Listen(stale, SocketOptions{}); !errors.Is(err, ErrSocketInUse) || !strings.Contains(err.Error(), stale) {
		t.Errorf("live socket: %v, want ErrSocketInUse naming the path", err)
	}
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	if c, err := net.Dial("unix", stale); err != nil {
		t.Errorf("the first listener stopped serving: %v", err)
	} else {
		c.Close()
	}

	// Anything that is not a socket is left alone.
	regular := filepath.Join(dir, "regular")
	os.WriteFile(regular, []byte("data"), 0o600)
	subdir := filepath.Join(dir, "subdir")
	os.Mkdir(subdir, 0o755)
	link := filepath.Join(dir, "link")
	os.Symlink(stale, link) // even a symlink to a stale-looking socket
	for _, path := range []string{regular, subdir, link} {
		if _, err := Listen(path, SocketOptions{}); !errors.Is(err, ErrNotSocket) {
			t.Errorf("Listen(%s) = %v, want ErrNotSocket", path, err)
		}
	}
	if b, _ := os.ReadFile(regular); string(b) != "data" {
		t.Error("the regular file changed")
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Error("the symlink was replaced")
	}

	// A missing directory is an error naming it.
	if _, err := Listen(filepath.Join(dir, "missing", "c.sock"), SocketOptions{}); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing directory: %v", err)
	}
}

func TestListenAtTheLengthLimit(t *testing.T) {
	dir := t.TempDir()
	name := strings.Repeat("s", MaxSocketPath-len(dir)-1)
	path := filepath.Join(dir, name)
	if len(path) != MaxSocketPath {
		t.Fatalf("path is %d bytes", len(path))
	}
	ln, err := Listen(path, SocketOptions{Mode: 0o660})
	if err != nil {
		t.Fatalf("a %d-byte path: %v", len(path), err)
	}
	defer ln.Close()
	if mode, _ := statSock(t, path); mode != 0o660 {
		t.Errorf("mode %v", mode)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := CheckSocketPath(path + "x"); err == nil || !strings.Contains(err.Error(), "107") {
		t.Errorf("CheckSocketPath(108 bytes) = %v", err)
	}
}

func TestCloseRemovesOnlyOurSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.sock")
	ln, err := Listen(path, SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Another process replaced the path since.
	os.Remove(path)
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	ln.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("Close removed a socket that was not ours: %v", err)
	}
}

func TestAccessAllows(t *testing.T) {
	a := &Access{UIDs: []uint32{1000}, GIDs: []uint32{50}}
	for _, tc := range []struct {
		uid, gid uint32
		want     bool
	}{{0, 0, true}, {1000, 1, true}, {7, 50, true}, {7, 7, false}, {65534, 65534, false}} {
		if got := a.Allows(unix.Ucred{Uid: tc.uid, Gid: tc.gid}); got != tc.want {
			t.Errorf("Allows(uid %d gid %d) = %v", tc.uid, tc.gid, got)
		}
	}
	var none *Access
	if !none.Allows(unix.Ucred{Uid: 12345}) {
		t.Error("a nil Access refused someone")
	}
	if _, err := SplitIDList("1,,2"); err == nil {
		t.Error("an empty element was accepted")
	}
	if ids, err := LookupUIDs([]string{"root", "42"}); err != nil || len(ids) != 2 || ids[0] != 0 || ids[1] != 42 {
		t.Errorf("LookupUIDs = %v, %v", ids, err)
	}
	if _, err := LookupGIDs([]string{"no-such-group-here"}); err == nil {
		t.Error("an unknown group resolved")
	}
}

func TestAcceptErrorsNameTheSocketNotItsPrivateBind(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := Listen(path, SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetDeadline(time.Now()) // the next Accept fails at once
	_, err = ln.Accept()
	ln.Close()
	if err == nil || !strings.Contains(err.Error(), path) || strings.Contains(err.Error(), ".consoleproxy-") {
		t.Errorf("Accept error %q: want one naming %s", err, path)
	}
}

func TestARemovedSocketNamesNothing(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.sock")
	ln, err := Listen(path, SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !ln.Names(path) {
		t.Fatal("the socket does not name itself")
	}
	// Closed, its file removed and its inode number free for another
	// file: the listener must not claim whatever gets it.
	ln.Close()
	for i := range 50 {
		other := filepath.Join(dir, fmt.Sprintf("f%d", i))
		os.WriteFile(other, nil, 0o600)
		if ln.Names(other) {
			t.Fatalf("a removed socket claims %s", other)
		}
	}
}
