package e2e

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Tests of what others do to the console log's files under the running
// daemon: truncate them, delete them, put a FIFO in their place.

const logHeader = "[consoleproxy] upstream connected\r\n" + "Linux version 6.1.0 (boot log)\nguest login: "

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

var lossNotice = regexp.MustCompile(`^\[consoleproxy\] console log: (\d+) bytes not logged \(log file deleted\)\r\n`)

// A console log deleted from under the daemon (or its whole directory) is
// noticed within a second of writing and created again, starting with the
// loss notice for what went into the deleted file after the daemon last
// saw it linked.
func TestDeletedLogIsCreatedAgain(t *testing.T) {
	for _, whole := range []bool{false, true} {
		name := "file"
		if whole {
			name = "directory"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			logDir := filepath.Join(dir, "logs")
			os.Mkdir(logDir, 0o755)
			logPath := filepath.Join(logDir, "console.log")
			_, daemon, v := startProxyIn(t, dir, "--console-log", logPath)
			want := logHeader + string(lines(0, 64<<10))
			v.write(t, []byte(want[len(logHeader):]))
			WaitFor(t, "the log to hold the output", func() bool { return string(fileContents(t, logPath)) == want })
			// Held open to read back what went into the file after the
			// deletion.
			deleted, err := os.Open(logPath)
			if err != nil {
				t.Fatal(err)
			}
			defer deleted.Close()
			deletedSize := func() int { fi, _ := deleted.Stat(); return int(fi.Size()) }
			atDeletion := len(want)
			if whole {
				err = os.RemoveAll(logDir)
			} else {
				err = os.Remove(logPath)
			}
			if err != nil {
				t.Fatal(err)
			}
			// The VM prints a line at a time until the daemon has noticed:
			// a file created again, or a write failing for want of its
			// directory.
			noticed := func() bool {
				if whole {
					return strings.Contains(daemon.Stderr.String(), "console log write failed")
				}
				_, err := os.Stat(logPath)
				return err == nil
			}
			deadline := time.Now().Add(WaitTimeout)
			for i := 0; !noticed(); i++ {
				if time.Now().After(deadline) {
					t.Fatalf("the daemon did not notice the deletion in %v of writing", WaitTimeout)
				}
				line := lines(100000+i, 1)
				v.write(t, line)
				want += string(line)
				WaitFor(t, "the line to be written", func() bool { return deletedSize() == len(want) || noticed() })
			}
			if whole {
				if msg := daemon.Stderr.String(); !strings.Contains(msg, "no such file or directory") {
					t.Errorf("the daemon log does not say why writing fails:\n%s", msg)
				}
				os.Mkdir(logDir, 0o755)
			}
			last := lines(200000, 1)
			v.write(t, last)
			want += string(last)
			WaitFor(t, "the log to be created again", func() bool { return bytes.HasSuffix(fileContents(t, logPath), last) })

			old, err := io.ReadAll(deleted)
			if err != nil {
				t.Fatal(err)
			}
			cur := fileContents(t, logPath)
			m := lossNotice.FindSubmatch(cur)
			if m == nil {
				t.Fatalf("the new log does not start with the loss notice: %q", cur[:min(len(cur), 120)])
			}
			if got := string(old) + string(cur[len(m[0]):]); got != want {
				t.Errorf("deleted + new log = %d bytes, want %d; first difference at %d", len(got), len(want), firstDiff(got, want))
			}
			// What went in after the deletion is lost for sure; what went in
			// before it, only since the daemon last looked.
			n, _ := strconv.Atoi(string(m[1]))
			if n < len(old)-atDeletion || n > len(old) {
				t.Errorf("the notice counts %d bytes; %d went into the file after its deletion, %d in all", n, len(old)-atDeletion, len(old))
			}
			if msg := daemon.Stderr.String(); !strings.Contains(msg, "deleted") {
				t.Errorf("the daemon log does not mention the deletion:\n%s", msg)
			}
		})
	}
}
