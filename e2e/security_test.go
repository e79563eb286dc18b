package e2e

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nobody is the uid and gid of the unprivileged client.
const nobody = 65534

func TestAllowUIDWithARealClientOfAnotherUser(t *testing.T) {
	Need(t, "socat")
	if os.Getuid() != 0 {
		t.Skip("running a client as another user needs root; CI runs as root")
	}
	for _, tc := range []struct {
		name, allow, want string
	}{
		{"root only", "0", "[consoleproxy] access denied\r\n"},
		{"nobody by uid", "65534", replay},
		{"nobody by name", "root,nobody", replay},
	} {
		// The name becomes part of the socket's path, where socat would take
		// a comma for an option separator.
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			// Let the unprivileged client reach the socket: the test's
			// directories are 0700.
			os.Chmod(dir, 0o755)
			os.Chmod(filepath.Dir(dir), 0o755)
			sock, daemon, _ := startProxyIn(t, dir, "--allow-uid", tc.allow, "--socket-mode", "0666")
			client := startCredential(t, nobody, "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
			if code := client.Wait(t); code != 0 {
				t.Fatalf("socat as nobody: exit %d: %s", code, client.Stderr)
			}
			if got := client.Stdout.String(); got != tc.want {
				t.Errorf("--allow-uid %s: nobody received %q, want %q", tc.allow, got, tc.want)
			}
			if tc.want != replay {
				WaitFor(t, "the refusal in the log", func() bool {
					return strings.Contains(daemon.Stderr.String(), "access denied") &&
						strings.Contains(daemon.Stderr.String(), "uid=65534")
				})
			}
		})
	}
}

// startCredential starts a program as uid and gid id.
func startCredential(t *testing.T, id uint32, name string, args ...string) *Proc {
	t.Helper()
	return StartWith(t, func(p *Proc) {
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: id, Gid: id}}
	}, strings.NewReader(""), name, args...)
}

func TestSecondProxyOnALivePathFails(t *testing.T) {
	dir := t.TempDir()
	sock, first, _ := startProxyIn(t, dir)
	second := Start(t, nil, binary, "--upstream", "unix:"+filepath.Join(dir, "vmm.sock"), "--listen", sock)
	if code := second.Wait(t); code != 1 {
		t.Fatalf("second proxy: exit %d, want 1", code)
	}
	if msg := second.Stderr.String(); !strings.Contains(msg, sock) || !strings.Contains(msg, "live process") {
		t.Errorf("second proxy's message %q does not name the live socket", msg)
	}
	// The first keeps serving.
	Need(t, "socat")
	client := Start(t, strings.NewReader(""), "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
	if client.Wait(t); client.Stdout.String() != replay {
		t.Errorf("the first proxy no longer serves: %q", client.Stdout.String())
	}
	select {
	case <-first.Done:
		t.Errorf("the first proxy exited: %s", first.Stderr)
	default:
	}
}

func TestOverlongSocketPathIsAUsageError(t *testing.T) {
	long := "/tmp/" + strings.Repeat("l", 120) + ".sock"
	for _, args := range [][]string{
		{"--upstream", "unix:/tmp/vmm.sock", "--listen", long},
		{"--upstream", "unix:" + long, "--listen", "/tmp/c.sock"},
		{"--upstream", "listen:" + long, "--listen", "/tmp/c.sock"},
		{"--upstream", "unix:/tmp/vmm.sock", "--listen", "/tmp/c.sock", "--listen-ro", long},
	} {
		p := Start(t, nil, binary, args...)
		if code := p.Wait(t); code != 2 || !strings.Contains(p.Stderr.String(), "longer than the system limit of 107") {
			t.Errorf("%q: exit %d, %q", args, code, p.Stderr)
		}
	}
}

// openToNobody makes dir and its parent reachable by the unprivileged
// user: the test's directories are 0700.
func openToNobody(t *testing.T, dir string) {
	t.Helper()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func TestListenUpstreamRefusesAPeerThatIsNotAllowed(t *testing.T) {
	Need(t, "socat")
	if os.Getuid() != 0 {
		t.Skip("running a peer as another user needs root; CI runs as root")
	}
	dir := t.TempDir()
	openToNobody(t, dir)
	serial, sock := filepath.Join(dir, "serial.sock"), filepath.Join(dir, "console.sock")
	daemon := Start(t, nil, binary, "--upstream", "listen:"+serial, "--listen", sock,
		"--socket-mode", "0666", "--allow-uid", "0", "--replay", "none")
	WaitFor(t, "the sockets", func() bool { return exists(serial) && exists(sock) })

	// The real VMM (root) connects first; an intruder then waits in the
	// backlog for the VMM's next restart, with a fake prompt ready.
	vmm1 := dialUnix(t, serial)
	WaitFor(t, "the first VMM to be accepted", func() bool { return strings.Count(daemon.Stderr.String(), "upstream connected") == 1 })
	intruder := StartWith(t, func(p *Proc) {
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	}, strings.NewReader("FAKE-PROMPT: "), "socat", "-t", "5", "-", "UNIX-CONNECT:"+serial)
	client := dialUnix(t, sock)
	vmm1.Close() // the VM restarts

	// The intruder is accepted next, and refused: closed at once (its
	// socat may fail writing its prompt into the closed connection).
	intruder.Wait(t)
	WaitFor(t, "the refusal in the daemon log", func() bool {
		log := daemon.Stderr.String()
		return strings.Contains(log, "VMM connection refused: access denied") && strings.Contains(log, "uid=65534")
	})
	vmm2 := dialUnix(t, serial)
	WaitFor(t, "the second VMM to be accepted", func() bool { return strings.Count(daemon.Stderr.String(), "upstream connected") == 2 })
	if _, err := client.Write([]byte("secret\n")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("secret\n"))
	vmm2.SetReadDeadline(time.Now().Add(WaitTimeout))
	if _, err := io.ReadFull(vmm2, got); err != nil || string(got) != "secret\n" {
		t.Fatalf("the VMM received %q, %v", got, err)
	}
	if out := intruder.Stdout.String(); out != "" {
		t.Errorf("the intruder received %q", out)
	}
	vmm2.Write([]byte("real prompt\n"))
	readUntilContains(t, client, "real prompt\n", func(b []byte) {
		if strings.Contains(string(b), "FAKE-PROMPT") {
			t.Fatalf("a client received the intruder's output: %q", b)
		}
	})
	// Every accepted VMM connection is logged with who it is.
	connected := regexp.MustCompile(`upstream connected: .*pid=` + strconv.Itoa(os.Getpid()) + ` uid=0 gid=0`)
	if n := len(connected.FindAllString(daemon.Stderr.String(), -1)); n != 2 {
		t.Errorf("%d upstream connected lines with this pid, uid and gid, want 2:\n%s", n, daemon.Stderr)
	}
}

func TestViewersCanWatchButNotType(t *testing.T) {
	Need(t, "socat")
	if os.Getuid() != 0 {
		t.Skip("running a client as another user needs root; CI runs as root")
	}
	for _, tc := range []struct {
		name       string
		flags      []string
		rwRefused  string // what nobody gets from the read-write socket: "" when connect fails
		roReceives string
	}{
		// The worked example: operators by mode, viewers by mode and group.
		{"by mode", []string{"--socket-mode", "0600", "--ro-socket-mode", "0666"}, "", replay},
		{"by uid", []string{"--socket-mode", "0666", "--allow-uid", "0", "--ro-allow-uid", "65534"}, "[consoleproxy] access denied\r\n", replay},
		// Without --ro-allow-uid the read-only socket has the read-write rules.
		{"defaults to read-write", []string{"--socket-mode", "0666", "--allow-uid", "0"}, "[consoleproxy] access denied\r\n", "[consoleproxy] access denied\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			openToNobody(t, dir)
			ro := filepath.Join(dir, "view.sock")
			sock, daemon, v := startProxyIn(t, dir, append([]string{"--listen-ro", ro}, tc.flags...)...)
			WaitFor(t, "the read-only socket", func() bool { return exists(ro) })

			typist := startCredential(t, nobody, "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock)
			code := typist.Wait(t)
			if tc.rwRefused == "" {
				if code == 0 || !strings.Contains(typist.Stderr.String(), "Permission denied") {
					t.Errorf("nobody connected to the 0600 read-write socket: exit %d, %s", code, typist.Stderr)
				}
			} else if got := typist.Stdout.String(); got != tc.rwRefused {
				t.Errorf("nobody on the read-write socket received %q, want %q", got, tc.rwRefused)
			}
			// A viewer that is let in types; one that is refused must not,
			// or the kernel may reset the connection before it reads the
			// refusal (input left unread at close).
			admitted := tc.roReceives == replay
			typed := ""
			if admitted {
				typed = "reboot\n"
			}
			viewer := StartWith(t, func(p *Proc) {
				p.Cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			}, strings.NewReader(typed), "socat", "-t", "1", "-", "UNIX-CONNECT:"+ro)
			if code := viewer.Wait(t); code != 0 {
				t.Fatalf("viewer socat: exit %d: %s", code, viewer.Stderr)
			}
			if got := viewer.Stdout.String(); got != tc.roReceives {
				t.Errorf("nobody on the read-only socket received %q, want %q", got, tc.roReceives)
			}
			// Nothing nobody typed reached the VM.
			if admitted {
				WaitFor(t, "the viewer to be gone", func() bool { return strings.Contains(daemon.Stderr.String(), "client disconnected") })
			}
			if in := v.input(); in != "" {
				t.Errorf("the VM received %q from nobody", in)
			}
		})
	}
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// dialUnix connects to the socket at path; the connection is closed at
// the test's cleanup.
func dialUnix(t *testing.T, path string) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readUntilContains reads c until what it received contains want, calling
// check on everything received after each read.
func readUntilContains(t *testing.T, c net.Conn, want string, check func([]byte)) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(WaitTimeout))
	var got []byte
	buf := make([]byte, 4096)
	for !strings.Contains(string(got), want) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		check(got)
		if err != nil {
			t.Fatalf("waiting for %q: %v; received %q", want, err, got)
		}
	}
	return got
}
