package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnitVerifies runs systemd-analyze verify on the template unit,
// instantiated, with ExecStart pointing at the binary under test (verify
// checks that it exists).
func TestSystemdUnitVerifies(t *testing.T) {
	Need(t, "systemd-analyze")
	unit, err := os.ReadFile(filepath.Join("..", "contrib", "systemd", "consoleproxy@.service"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	text := strings.ReplaceAll(string(unit), "/usr/local/bin/consoleproxy", binary)
	if err := os.WriteFile(filepath.Join(dir, "consoleproxy@.service"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	instance := filepath.Join(dir, "consoleproxy@vm1.service")
	if err := os.Symlink("consoleproxy@.service", instance); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", instance).CombinedOutput()
	if err != nil || len(out) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, err = exec.Command("systemd-analyze", "security", "--offline=true", "--threshold=20", instance).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure above 2.0 (scale 0-100: 20): %v\n%s", err, out[max(0, len(out)-300):])
	}
}
