package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Tests of what others do to the console log's files under the running
// daemon: put a FIFO in their place.

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
