package e2e

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// WaitTimeout bounds every wait of the end-to-end tests: generous, because
// CI machines are shared, and never a substitute for a condition.
const WaitTimeout = 30 * time.Second

// Main is a test package's TestMain: it builds consoleproxy (with the race
// detector when race is set) into a temporary directory that other users
// can enter, since some tests run it as an unprivileged user; it stores the
// binary's path in *binary, runs the tests, fails the run if a goroutine
// outlived them, and exits.
func Main(m *testing.M, race bool, binary *string) {
	os.Exit(runMain(m, race, binary))
}

func runMain(m *testing.M, race bool, binary *string) int {
	dir, err := os.MkdirTemp("", "consoleproxy-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	if *binary, err = build(dir, race); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	// Every test's processes and fake VMMs are reaped by its cleanups.
	if err := goleak.Find(); code == 0 && err != nil {
		fmt.Fprintln(os.Stderr, "goroutines leaked:", err)
		code = 1
	}
	return code
}

// build builds consoleproxy into dir and returns its path.
func build(dir string, race bool) (string, error) {
	bin := filepath.Join(dir, "consoleproxy")
	args := []string{"build", "-o", bin}
	if race {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "github.com/consoleproxy/consoleproxy/cmd/consoleproxy")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return "", fmt.Errorf("build consoleproxy: %w", err)
	}
	return bin, nil
}

// Need skips the test when a program it drives is not installed.
func Need(t testing.TB, programs ...string) {
	t.Helper()
	for _, p := range programs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed; .ci/run installs it", p)
		}
	}
}

// Proc is a process a test started; it is killed at the test's cleanup.
type Proc struct {
	Cmd    *exec.Cmd
	Stdout *SyncBuffer
	Stderr *SyncBuffer
	// Done is closed when the process has exited.
	Done chan struct{}
	err  error
}

// SyncBuffer is a bytes.Buffer safe for a process's writes and the test's
// reads at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start starts a program with stdin as its input.
func Start(t testing.TB, stdin io.Reader, name string, args ...string) *Proc {
	t.Helper()
	return StartWith(t, nil, stdin, name, args...)
}

// StartWith is Start with a hook to adjust the command before it starts.
func StartWith(t testing.TB, adjust func(*Proc), stdin io.Reader, name string, args ...string) *Proc {
	t.Helper()
	cmd := exec.Command(name, args...)
	p := &Proc{Cmd: cmd, Stdout: &SyncBuffer{}, Stderr: &SyncBuffer{}, Done: make(chan struct{})}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, p.Stdout, p.Stderr
	if adjust != nil {
		adjust(p)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.Done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.Done
	})
	return p
}

// Wait waits for the process to exit and returns its exit code, or -1 when
// a signal killed it.
func (p *Proc) Wait(t testing.TB) int {
	t.Helper()
	select {
	case <-p.Done:
	case <-time.After(WaitTimeout):
		t.Fatalf("%s did not exit; stderr:\n%s", p.Cmd.Path, p.Stderr)
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("%s: %v", p.Cmd.Path, p.err)
	return -1
}

// WaitFor polls cond until it holds, failing the test after WaitTimeout.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
