package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Tests of what others do to the console log's files under the running
// daemon: truncate them, put a FIFO in their place.

// A FIFO opened to read blocks until a writer comes: the daemon must
// refuse it, not wait for one.
func TestFIFOAtTheConsoleLogIsRefused(t *testing.T) {
	for _, at := range []string{"", ".1"} {
		t.Run("PATH"+at, func(t *testing.T) {
			dir := t.TempDir()
			logPath := filepath.Join(dir, "console.log")
			if err := syscall.Mkfifo(logPath+at, 0o640); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(dir, "c.sock")
			p := Start(t, nil, binary, "--upstream", "unix:"+filepath.Join(dir, "vmm.sock"), "--listen", sock, "--console-log", logPath)
			if code := p.Wait(t); code != 1 {
				t.Errorf("exit %d, want 1", code)
			}
			want := logPath + at + ": not a regular file (a FIFO)"
			if msg := p.Stderr.String(); !strings.Contains(msg, want) || strings.Count(msg, "\n") != 1 {
				t.Errorf("stderr %q, want one line with %q", msg, want)
			}
			if _, err := os.Lstat(sock); !os.IsNotExist(err) {
				t.Errorf("the client socket was created: %v", err)
			}
		})
	}
}

// An external truncation (by hand, or logrotate's copytruncate) is
// followed: the next rotation counts from the file's real size, and the
// file holds exactly what came after the truncation.
func TestExternalTruncationIsFollowed(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	_, _, v := startProxyIn(t, dir, "--console-log", logPath, "--console-log-max-size", "256KiB", "--console-log-max-files", "2")
	first := lines(0, 200<<10)
	v.write(t, first)
	WaitFor(t, "the log to hold the first part", func() bool { return bytes.HasSuffix(fileContents(t, logPath), first) })
	if err := os.Truncate(logPath, 0); err != nil {
		t.Fatal(err)
	}
	second := lines(100000, 200<<10)
	v.write(t, second)
	WaitFor(t, "the log to hold the second part", func() bool { return bytes.HasSuffix(concatLogs(t, logPath, 1), second) })
	if _, err := os.Stat(logPath + ".1"); !os.IsNotExist(err) {
		t.Fatalf("rotated at 200 KiB after the truncation, with a 256 KiB limit: %v", err)
	}
	if got := fileContents(t, logPath); !bytes.Equal(got, second) {
		t.Fatalf("after the truncation the log holds %d bytes (%d NUL), want the %d written since", len(got), bytes.Count(got, []byte{0}), len(second))
	}
	third := lines(200000, 100<<10)
	v.write(t, third)
	WaitFor(t, "the log to hold the third part", func() bool { return bytes.HasSuffix(concatLogs(t, logPath, 1), third) })
	rotated := fileContents(t, logPath+".1")
	if got := append(bytes.Clone(rotated), fileContents(t, logPath)...); !bytes.Equal(got, append(second, third...)) {
		t.Errorf("PATH.1 + PATH = %d bytes, want %d; first difference at %d", len(got), len(second)+len(third), firstDiff(string(got), string(second)+string(third)))
	}
	if len(rotated) < 256<<10-4096 || len(rotated) > 256<<10 {
		t.Errorf("PATH.1 holds %d bytes, want the cut within 4 KiB before 256 KiB", len(rotated))
	}
}
