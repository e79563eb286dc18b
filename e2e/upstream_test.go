package e2e

import (
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSocatPTYAsBarePath drives the binary against a real PTY made by
// socat, named by a bare path (a symlink to a character device, which means
// pty:), as QEMU's -serial pty or Cloud Hypervisor's --serial pty expose.
func TestSocatPTYAsBarePath(t *testing.T) {
	Need(t, "socat")
	dir := t.TempDir()
	link, feeder := filepath.Join(dir, "serial.pty"), filepath.Join(dir, "feeder.sock")
	// The "VMM": what is written to feeder comes out of the PTY, and what
	// is typed into the PTY comes back out of feeder.
	Start(t, nil, "socat", "PTY,rawer,link="+link, "UNIX-LISTEN:"+feeder)
	WaitFor(t, "socat's PTY", func() bool { _, err := filepath.EvalSymlinks(link); return err == nil })
	var vm net.Conn
	WaitFor(t, "socat's feeder socket", func() bool {
		c, err := net.Dial("unix", feeder)
		vm = c
		return err == nil
	})
	defer vm.Close()

	sock := filepath.Join(dir, "console.sock")
	daemon := Start(t, nil, binary, "--upstream", link, "--listen", sock, "--log-level", "debug")
	WaitFor(t, "the proxy to open the PTY", func() bool { return strings.Contains(daemon.Stderr.String(), "upstream connected") })
	if !strings.Contains(daemon.Stderr.String(), "upstream=pty:"+link) {
		t.Errorf("a bare path to a PTY was not taken as pty:; log:\n%s", daemon.Stderr)
	}
	vm.Write([]byte("boot over a pty\r\n"))
	client := Start(t, nil, "socat", "-", "UNIX-CONNECT:"+sock)
	want := "[consoleproxy] upstream connected\r\nboot over a pty\r\n"
	WaitFor(t, "the replay", func() bool { return client.Stdout.String() == want })

	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte("typed\r\n"))
	vm.SetReadDeadline(time.Now().Add(WaitTimeout))
	buf := make([]byte, 7)
	if _, err := io.ReadFull(vm, buf); err != nil || string(buf) != "typed\r\n" {
		t.Errorf("the VMM read %q, %v; want the input untranslated", buf, err)
	}
}
