package chaos

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/consoleproxy/consoleproxy/e2e"
)

// snapshot records every entry under dir with its type and content, to
// show that a failed start changed nothing that was there.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		info := d.Type().String()
		if d.Type().IsRegular() {
			b, _ := os.ReadFile(path)
			info += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		if d.Type()&fs.ModeSymlink != 0 {
			target, _ := os.Readlink(path)
			info += " -> " + target
		}
		m[path] = info
		return nil
	})
	return m
}

func TestBadInvocationsAndEnvironments(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755)
	p := func(name string) string { return filepath.Join(dir, name) }
	up := "unix:" + p("vmm.sock")
	ok := p("ok.sock")
	long := "/tmp/" + strings.Repeat("x", 110)

	// The environment: things in the way.
	os.WriteFile(p("file"), []byte("a regular file"), 0o644)
	os.Mkdir(p("adir"), 0o755)
	os.Symlink(p("file"), p("link.log"))
	os.Symlink(p("nowhere"), p("dangling.sock"))
	live, err := net.Listen("unix", p("live.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	os.Mkdir(p("rootonly"), 0o700) // unreachable for uid 65534
	readOnly := p("ro")
	root := os.Getuid() == 0
	if root {
		mountTmpfs(t, readOnly, "size=64k,ro")
	}

	type tc struct {
		name   string
		args   []string
		code   int
		want   string
		asUser bool // run as uid 65534
		root   bool // needs root to set up
	}
	cases := []tc{
		{"no arguments", nil, 2, "--upstream is required", false, false},
		{"no --listen", []string{"--upstream", up}, 2, "--listen is required", false, false},
		{"unknown flag", []string{"--upstream", up, "--listen", ok, "--colour"}, 2, "flag provided but not defined: -colour", false, false},
		{"positional argument", []string{"--upstream", up, "--listen", ok, "vm1"}, 2, `unexpected argument "vm1"`, false, false},
		{"unknown upstream kind", []string{"--upstream", "serial:/dev/ttyS0", "--listen", ok}, 2, `unknown kind "serial"`, false, false},
		{"bare upstream that is a file", []string{"--upstream", p("file"), "--listen", ok}, 2, "neither a socket nor a character device", false, false},
		{"bare upstream that is missing", []string{"--upstream", p("missing"), "--listen", ok}, 2, "cannot be inspected", false, false},
		{"tcp without port", []string{"--upstream", "tcp:localhost", "--listen", ok}, 2, "want tcp:HOST:PORT", false, false},
		{"tcp port out of range", []string{"--upstream", "tcp:localhost:70000", "--listen", ok}, 2, "not 1 to 65535", false, false},
		{"empty pty path", []string{"--upstream", "pty:", "--listen", ok}, 2, "empty path", false, false},
		{"upstream path too long", []string{"--upstream", "unix:" + long, "--listen", ok}, 2, "longer than the system limit of 107", false, false},
		{"listen: path too long", []string{"--upstream", "listen:" + long, "--listen", ok}, 2, "longer than the system limit of 107", false, false},
		{"--listen too long", []string{"--upstream", up, "--listen", long}, 2, "longer than the system limit of 107", false, false},
		{"--listen-ro too long", []string{"--upstream", up, "--listen", ok, "--listen-ro", long}, 2, "longer than the system limit of 107", false, false},
		{"--listen-ro same as --listen", []string{"--upstream", up, "--listen", ok, "--listen-ro", ok}, 2, "name the same file", false, false},
		{"buffer too small", []string{"--upstream", up, "--listen", ok, "--buffer-size", "1K"}, 2, "outside 4KiB to 1GiB", false, false},
		{"buffer too large", []string{"--upstream", up, "--listen", ok, "--buffer-size", "2G"}, 2, "outside 4KiB to 1GiB", false, false},
		{"buffer with a decimal unit", []string{"--upstream", up, "--listen", ok, "--buffer-size", "1MB"}, 2, `unknown unit "MB"`, false, false},
		{"buffer not a number", []string{"--upstream", up, "--listen", ok, "--buffer-size", "big"}, 2, "is not a size", false, false},
		{"replay nonsense", []string{"--upstream", up, "--listen", ok, "--replay", "some"}, 2, "--replay: want all, none or a size", false, false},
		{"slow-client nonsense", []string{"--upstream", up, "--listen", ok, "--slow-client", "block"}, 2, "not skip or disconnect", false, false},
		{"max-clients zero", []string{"--upstream", up, "--listen", ok, "--max-clients", "0"}, 2, "at least 1", false, false},
		{"socket-mode not octal", []string{"--upstream", up, "--listen", ok, "--socket-mode", "rw-rw----"}, 2, "not an octal mode", false, false},
		{"socket-mode with setuid bits", []string{"--upstream", up, "--listen", ok, "--socket-mode", "4755"}, 2, "not an octal mode", false, false},
		{"allow-uid with an empty element", []string{"--upstream", up, "--listen", ok, "--allow-uid", "0,"}, 2, "empty element", false, false},
		{"log level nonsense", []string{"--upstream", up, "--listen", ok, "--log-level", "verbose"}, 2, "--log-level", false, false},
		{"log format nonsense", []string{"--upstream", up, "--listen", ok, "--log-format", "yaml"}, 2, "not text or json", false, false},
		{"notices not a boolean", []string{"--upstream", up, "--listen", ok, "--notices=sometimes"}, 2, "invalid boolean", false, false},
		{"log option without a log", []string{"--upstream", up, "--listen", ok, "--console-log-max-size", "1M"}, 2, "needs --console-log", false, false},
		{"log max files negative", []string{"--upstream", up, "--listen", ok, "--console-log", p("c.log"), "--console-log-max-files", "-2"}, 2, "at least 0", false, false},
		{"unknown user", []string{"--upstream", up, "--listen", ok, "--allow-uid", "no-such-user"}, 1, "unknown user no-such-user", false, false},
		{"unknown group", []string{"--upstream", up, "--listen", ok, "--socket-group", "no-such-group"}, 1, "unknown group no-such-group", false, false},
		{"listen directory missing", []string{"--upstream", up, "--listen", p("missing/c.sock")}, 1, p("missing"), false, false},
		{"listen path is a file", []string{"--upstream", up, "--listen", p("file")}, 1, "is not a socket; not removing it", false, false},
		{"listen path is a directory", []string{"--upstream", up, "--listen", p("adir")}, 1, "is not a socket; not removing it", false, false},
		{"listen path is a dangling symlink", []string{"--upstream", up, "--listen", p("dangling.sock")}, 1, "is not a socket; not removing it", false, false},
		{"listen path is live", []string{"--upstream", up, "--listen", p("live.sock")}, 1, "a live process is listening on it", false, false},
		{"listen: upstream path is live", []string{"--upstream", "listen:" + p("live.sock"), "--listen", ok}, 1, "a live process is listening on it", false, false},
		{"console log is a symlink", []string{"--upstream", up, "--listen", ok, "--console-log", p("link.log")}, 1, "symbolic link", false, false},
		{"console log is a directory", []string{"--upstream", up, "--listen", ok, "--console-log", p("adir")}, 1, "not a regular file", false, false},
		{"console log directory missing", []string{"--upstream", up, "--listen", ok, "--console-log", p("missing/c.log")}, 1, "no such file or directory", false, false},
		{"permission denied for the socket", []string{"--upstream", up, "--listen", p("rootonly/c.sock")}, 1, "permission denied", true, true},
		{"permission denied for the log", []string{"--upstream", up, "--listen", p("nobody.sock"), "--console-log", p("rootonly/c.log")}, 1, "permission denied", true, true},
		{"read-only filesystem for the socket", []string{"--upstream", up, "--listen", filepath.Join(readOnly, "c.sock")}, 1, "read-only file system", false, true},
		{"read-only filesystem for the log", []string{"--upstream", up, "--listen", ok, "--console-log", filepath.Join(readOnly, "c.log")}, 1, "read-only file system", false, true},
	}
	before := snapshot(t, dir)
	ran := 0
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.root && !root {
				t.Skip("needs root to set up; CI runs as root")
			}
			adjust := func(p *e2e.Proc) {}
			if c.asUser {
				adjust = func(p *e2e.Proc) {
					p.Cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
				}
			}
			proc := e2e.StartWith(t, adjust, nil, binary, c.args...)
			code := proc.Wait(t)
			msg := proc.Stderr.String()
			if code != c.code || !strings.Contains(msg, c.want) || strings.Count(msg, "\n") != 1 {
				t.Errorf("exit %d, stderr %q; want exit %d and one line containing %q", code, msg, c.code, c.want)
			}
			ran++
		})
	}
	after := snapshot(t, dir)
	for path, info := range before {
		if after[path] != info {
			t.Errorf("%s changed or disappeared: %q, now %q", path, info, after[path])
		}
	}
	figure(t, "%d malformed invocations and environments: each exits with its code (2 usage, 1 runtime) and one line naming the problem; nothing that was there was changed or removed", ran)
}
