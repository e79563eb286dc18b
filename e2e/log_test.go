package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// bootLog is what the e2e VMM prints when the proxy connects.
const bootLog = "Linux version 6.1.0 (boot log)\\nguest login: "

// lines returns n bytes of numbered console lines starting at line from.
func lines(from, n int) []byte {
	var b []byte
	for i := from; len(b) < n; i++ {
		b = fmt.Appendf(b, "console line %07d %s\n", i, strings.Repeat("=", i%61))
	}
	return b
}

func fileContents(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return b
}

// concatLogs returns PATH.n … PATH.1 PATH concatenated.
func concatLogs(t *testing.T, path string, n int) []byte {
	t.Helper()
	var all []byte
	for k := n; k >= 1; k-- {
		all = append(all, fileContents(t, fmt.Sprintf("%s.%d", path, k))...)
	}
	return append(all, fileContents(t, path)...)
}

func TestTailFollowsEveryRotation(t *testing.T) {
	Need(t, "tail")
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	_, _, v := startProxyIn(t, dir, "--console-log", logPath, "--console-log-max-size", "64KiB", "--console-log-max-files", "3")
	tail := Start(t, nil, "tail", "-F", "-n", "+1", "-s", "0.05", logPath)
	want := "[consoleproxy] upstream connected\r\n" + strings.ReplaceAll(bootLog, `\n`, "\n")
	data := lines(0, 2<<20)
	// Paced so that tail, which reads a file until it is replaced, is never
	// more than a fraction of a file behind: a follower slower than the
	// rotation can lose a whole file, which is not what this test is about.
	for off := 0; off < len(data); off += 16 << 10 {
		chunk := data[off:min(off+16<<10, len(data))]
		v.write(t, chunk)
		want += string(chunk)
		WaitFor(t, "tail to follow", func() bool { return len(tail.Stdout.String()) >= len(want) })
	}
	if got := tail.Stdout.String(); got != want {
		t.Fatalf("tail -F saw %d bytes, want %d; first difference at %d", len(got), len(want), firstDiff(got, want))
	}
	if n := strings.Count(tail.Stderr.String(), "has been replaced"); n < 20 {
		t.Errorf("tail saw %d rotations, want at least 20; stderr:\n%s", n, tail.Stderr)
	}
	if all := concatLogs(t, logPath, 3); !strings.HasSuffix(want, string(all)) || len(all) < 3*(64<<10-4096) {
		t.Errorf("PATH.3 … PATH (%d bytes) are not the tail of the stream", len(all))
	}
	if _, err := os.Stat(logPath + ".4"); !os.IsNotExist(err) {
		t.Errorf("%s.4 exists", logPath)
	}
}

func firstDiff(a, b string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func TestSIGHUPAfterExternalRenameLosesNothing(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	_, daemon, v := startProxyIn(t, dir, "--console-log", logPath)
	a, b, c := lines(0, 100<<10), lines(100000, 100<<10), lines(200000, 100<<10)
	v.write(t, a)
	WaitFor(t, "the log to hold A", func() bool { return bytes.HasSuffix(fileContents(t, logPath), a) })
	if err := os.Rename(logPath, logPath+".old"); err != nil {
		t.Fatal(err)
	}
	v.write(t, b) // lands in the renamed file, through the open descriptor
	daemon.Cmd.Process.Signal(syscall.SIGHUP)
	WaitFor(t, "the reopen", func() bool { return strings.Contains(daemon.Stderr.String(), "console log reopened") })
	v.write(t, c)
	WaitFor(t, "the log to hold C", func() bool { return bytes.HasSuffix(fileContents(t, logPath), c) })
	got := append(fileContents(t, logPath+".old"), fileContents(t, logPath)...)
	want := "[consoleproxy] upstream connected\r\n" + strings.ReplaceAll(bootLog, `\n`, "\n") + string(a) + string(b) + string(c)
	if string(got) != want {
		t.Errorf("old + new log = %d bytes, want %d; first difference at %d", len(got), len(want), firstDiff(string(got), want))
	}
	fi, err := os.Stat(logPath)
	if err != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("new log: %v, mode %v; want 0640", err, fi.Mode().Perm())
	}
}

func TestTimestampsOnlyInTheLog(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	sock, daemon, v := startProxyIn(t, dir, "--console-log", logPath, "--console-log-timestamps", "--replay", "none")
	// The VMM's boot banner must be history before the client comes, or it
	// arrives as live output.
	WaitFor(t, "the boot banner in the log", func() bool { return bytes.Contains(fileContents(t, logPath), []byte("guest login: ")) })
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// With no replay, the client sees the output only if it is admitted first.
	WaitFor(t, "the client to attach", func() bool { return strings.Contains(daemon.Stderr.String(), "client connected") })
	v.write(t, []byte("\nfirst\nsecond\n"))
	conn.SetReadDeadline(time.Now().Add(WaitTimeout))
	got := make([]byte, len("\nfirst\nsecond\n"))
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != "\nfirst\nsecond\n" {
		t.Errorf("client stream %q, %v; want no timestamps", got, err)
	}
	WaitFor(t, "the log", func() bool { return bytes.HasSuffix(fileContents(t, logPath), []byte("second\n")) })
	ts := `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z `
	re := regexp.MustCompile(`^` + ts + `\[consoleproxy\] upstream connected\r\n` + ts + `Linux version 6\.1\.0 \(boot log\)\n` +
		ts + `guest login: \n` + ts + `first\n` + ts + `second\n$`)
	if log := fileContents(t, logPath); !re.Match(log) {
		t.Errorf("log does not have a timestamp on every line:\n%s", log)
	}
}

func TestRestartReplaysHistoryFromTheLog(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	_, daemon, v := startProxyIn(t, dir, "--console-log", logPath, "--console-log-timestamps")
	v.write(t, []byte("\nhistory before the restart\n"))
	WaitFor(t, "the log", func() bool { return bytes.HasSuffix(fileContents(t, logPath), []byte("restart\n")) })
	daemon.Cmd.Process.Signal(syscall.SIGTERM)
	if code := daemon.Wait(t); code != 0 {
		t.Fatalf("exit %d: %s", code, daemon.Stderr)
	}

	// A new proxy on the same log, with a VMM that has rebooted.
	os.Remove(filepath.Join(dir, "vmm.sock"))
	sock, _, _ := startProxyIn(t, dir, "--console-log", logPath, "--console-log-timestamps")
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	boot := strings.ReplaceAll(bootLog, `\n`, "\n")
	want := "[consoleproxy] upstream connected\r\n" + boot + "\nhistory before the restart\n" +
		"[consoleproxy] restarted; history above is from the console log\r\n" +
		"[consoleproxy] upstream connected\r\n" + boot
	conn.SetReadDeadline(time.Now().Add(WaitTimeout))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != want {
		t.Errorf("after restart the client got %q, %v; want %q", got, err, want)
	}
}

func TestSymlinkedLogIsRefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "passwd")
	os.WriteFile(target, []byte("root:x:0:0\n"), 0o644)
	link := filepath.Join(dir, "console.log")
	os.Symlink(target, link)
	p := Start(t, nil, binary, "--upstream", "unix:"+filepath.Join(dir, "vmm.sock"), "--listen", filepath.Join(dir, "c.sock"), "--console-log", link)
	if code := p.Wait(t); code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if msg := p.Stderr.String(); !strings.Contains(msg, "symbolic link") || strings.Count(msg, "\n") != 1 {
		t.Errorf("stderr %q, want one line about the symbolic link", msg)
	}
	if b, _ := os.ReadFile(target); string(b) != "root:x:0:0\n" {
		t.Errorf("target changed: %q", b)
	}
}
