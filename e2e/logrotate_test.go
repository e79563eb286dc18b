package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// TestLogrotateRotatesTheLiveLogWithNoByteLost runs the real logrotate, with
// create and a postrotate SIGHUP, against a proxy while the VM streams.
func TestLogrotateRotatesTheLiveLogWithNoByteLost(t *testing.T) {
	Need(t, "logrotate")
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	_, daemon, v := startProxyIn(t, dir, "--console-log", logPath, "--console-log-max-size", "0")
	conf := filepath.Join(dir, "logrotate.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`%s {
    rotate 10
    create 0640
    missingok
    postrotate
        kill -HUP %d
    endscript
}
`, logPath, daemon.Cmd.Process.Pid)), 0o644)

	// The VM prints while logrotate runs.
	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		written []byte
	)
	v.write(t, nil) // waits for the proxy's connection
	wg.Go(func() {
		for i := 0; !stop.Load(); i++ {
			line := fmt.Appendf(nil, "line %06d %s\n", i, strings.Repeat("~", i%40))
			if err := v.send(line); err != nil {
				t.Errorf("VMM write: %v", err)
				return
			}
			written = append(written, line...)
		}
	})
	for i := range 3 {
		out, err := exec.Command("logrotate", "-f", "-s", filepath.Join(dir, "state"), conf).CombinedOutput()
		if err != nil {
			t.Fatalf("logrotate #%d: %v\n%s", i+1, err, out)
		}
		WaitFor(t, "the reopen", func() bool { return strings.Count(daemon.Stderr.String(), "console log reopened") >= i+1 })
	}
	stop.Store(true)
	wg.Wait()
	want := "[consoleproxy] upstream connected\r\n" + strings.ReplaceAll(bootLog, `\n`, "\n") + string(written)
	// By length: a line's tail (padding and a newline) recurs, its whole
	// does not matter here.
	WaitFor(t, "the log to catch up", func() bool { return len(concatLogs(t, logPath, 3)) >= len(want) })
	if got := string(concatLogs(t, logPath, 3)); got != want {
		t.Errorf("console.log.3 … console.log hold %d bytes, want %d; first difference at %d", len(got), len(want), firstDiff(got, want))
	}
	for k := 1; k <= 3; k++ {
		if fi, err := os.Stat(fmt.Sprintf("%s.%d", logPath, k)); err != nil || fi.Size() == 0 {
			t.Errorf("rotation %d left no file: %v", k, err)
		}
	}
}

// TestLogrotateCopytruncateIsFollowed runs the real logrotate with
// copytruncate (no signal: logrotate copies the file, then truncates it in
// place) against a proxy while the VM streams. logrotate loses what is
// written between its copy and its truncate, by its own design; everything
// else must be in the files once, in order, with no NUL bytes: each file is
// one stretch of the stream, the stretches in order and apart, the last
// one reaching the end.
func TestLogrotateCopytruncateIsFollowed(t *testing.T) {
	Need(t, "logrotate")
	dir := t.TempDir()
	logPath := filepath.Join(dir, "console.log")
	_, _, v := startProxyIn(t, dir, "--console-log", logPath, "--console-log-max-size", "0")
	conf := filepath.Join(dir, "logrotate.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`%s {
    rotate 10
    copytruncate
    missingok
}
`, logPath)), 0o644)

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		written []byte
	)
	v.write(t, nil) // waits for the proxy's connection
	wg.Go(func() {
		for i := 0; !stop.Load(); i++ {
			line := fmt.Appendf(nil, "line %06d %s\n", i, strings.Repeat("~", i%40))
			if err := v.send(line); err != nil {
				t.Errorf("VMM write: %v", err)
				return
			}
			written = append(written, line...)
		}
	})
	for i := range 3 {
		WaitFor(t, "output in the log", func() bool { fi, err := os.Stat(logPath); return err == nil && fi.Size() > 64<<10 })
		out, err := exec.Command("logrotate", "-f", "-s", filepath.Join(dir, "state"), conf).CombinedOutput()
		if err != nil {
			t.Fatalf("logrotate #%d: %v\n%s", i+1, err, out)
		}
	}
	WaitFor(t, "output after the last truncation", func() bool { fi, err := os.Stat(logPath); return err == nil && fi.Size() > 64<<10 })
	stop.Store(true)
	wg.Wait()
	stream := "[consoleproxy] upstream connected\r\n" + strings.ReplaceAll(bootLog, `\n`, "\n") + string(written)
	WaitFor(t, "the log to catch up", func() bool {
		return strings.HasSuffix(string(fileContents(t, logPath)), string(written[len(written)-200:]))
	})

	end := 0 // where the previous file's stretch ended in the stream
	for k := 3; k >= 0; k-- {
		name := logPath
		if k > 0 {
			name = fmt.Sprintf("%s.%d", logPath, k)
		}
		b := string(fileContents(t, name))
		if nul := strings.Count(b, "\x00"); nul > 0 || len(b) == 0 {
			t.Fatalf("%s: %d bytes, %d of them NUL", name, len(b), nul)
		}
		// Lines are numbered, so a stretch longer than a line is found in
		// one place only.
		at := strings.Index(stream[end:], b)
		if at < 0 {
			t.Fatalf("%s (%d bytes) is not one stretch of the stream after byte %d: a duplicate, a reordering or a gap inside it; first difference at %d",
				name, len(b), end, firstDiff(b, stream[end:]))
		}
		if k == 3 && at != 0 {
			t.Errorf("%s starts at byte %d of the stream, want 0", name, at)
		}
		if k < 3 {
			t.Logf("copytruncate window before %s: %d bytes lost", filepath.Base(name), at)
		}
		end += at + len(b)
	}
	if end != len(stream) {
		t.Errorf("the log ends at byte %d of the stream's %d", end, len(stream))
	}
}
