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
