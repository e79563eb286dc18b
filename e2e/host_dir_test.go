package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestHostModeDirectoryBeforeItsSocket: a platform creates a VM's
// directory first and its VMM creates the socket in it later (QEMU takes a
// moment to start). The proxy must wait inside the directory, whether it
// was there before the daemon started or came after.
//
// Directory a (no socket yet) sorts before b (with its socket), and is
// created first: once b's console is attached, the proxy has looked at a
// too, so the socket made in a afterwards is one it must notice.
func TestHostModeDirectoryBeforeItsSocket(t *testing.T) {
	Need(t, "socat")
	for _, tc := range []struct {
		name   string
		before bool // the directories exist when the daemon starts
	}{
		{"directory before the daemon", true},
		{"directory after the daemon", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vms := filepath.Join(t.TempDir(), "vms")
			if err := os.Mkdir(vms, 0o700); err != nil {
				t.Fatal(err)
			}
			sock := func(name string) string { return filepath.Join(vms, name, "console.sock") }
			makeDirs := func() {
				t.Helper()
				for _, name := range []string{"a", "b"} {
					if err := os.Mkdir(filepath.Join(vms, name), 0o700); err != nil {
						t.Fatal(err)
					}
				}
				startVMM(t, filepath.Join(vms, "b", "vmm.sock"))
			}
			if tc.before {
				makeDirs()
			}
			daemon := Start(t, nil, binary, "--upstream", "unix:"+vms+"/*/vmm.sock", "--listen", "{dir}/console.sock")
			if !tc.before {
				WaitFor(t, "the daemon to start", func() bool { return strings.Contains(daemon.Stderr.String(), "started") })
				makeDirs()
			}
			WaitFor(t, "b's console", func() bool { _, err := os.Stat(sock("b")); return err == nil })
			if _, err := os.Stat(sock("a")); err == nil {
				t.Fatal("a has a console before its VMM's socket exists")
			}

			startVMM(t, filepath.Join(vms, "a", "vmm.sock"))
			WaitFor(t, "a's console, once its socket appeared in its directory", func() bool {
				_, err := os.Stat(sock("a"))
				return err == nil
			})
			p := Start(t, strings.NewReader(""), "socat", "-t", "1", "-", "UNIX-CONNECT:"+sock("a"))
			if p.Wait(t); p.Stdout.String() != replay {
				t.Errorf("a's console replayed %q, want %q", p.Stdout, replay)
			}
		})
	}
}
