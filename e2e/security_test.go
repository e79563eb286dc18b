package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
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
