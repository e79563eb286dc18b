package e2e

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// startNamedGuest boots the test guest on a QEMU server socket at serial,
// with name on its kernel command line: the kernel prints its command line
// early in the boot, so each guest's boot log says which guest it is.
func startNamedGuest(t *testing.T, name, serial string) *Proc {
	t.Helper()
	kernel, initrd := guest(t)
	return Start(t, nil, "qemu-system-x86_64", "-accel", accel(), "-m", "256", "-nodefaults", "-no-reboot",
		"-display", "none", "-monitor", "none", "-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 vmname="+name,
		"-chardev", "socket,id=s0,path="+serial+",server=on,wait=off", "-serial", "chardev:s0")
}

// cmdlineRE finds the guest's name where the kernel prints its command
// line: three times in a boot ("Command line:", "Kernel command line:",
// and among the parameters passed to user space). A test may rely on
// some of them only: the kernel writes its early messages to the 16550
// by polling with a short timeout, and on a loaded machine QEMU's socket
// falls behind a burst of one-byte writes and the guest overwrites a few
// bytes (seen here with socat as the only reader, never with -serial
// file:). What user space writes goes through the tty and is not lost.
var cmdlineRE = regexp.MustCompile(`vmname=(vm\d+)`)

const retiredNotice = "[consoleproxy] console retired\r\n"

// TestQEMUHostModeThreeGuests: three QEMU guests, booted in parallel under
// one proxy in host mode, each in its own directory that the pattern
// matches. Each console replays its own guest's boot to a late client;
// typing reaches the right guest only; killing one guest and removing its
// directory retires its console (notice, clients closed, socket files
// gone, out of the status document) while the others keep streaming.
func TestQEMUHostModeThreeGuests(t *testing.T) {
	guest(t)
	Need(t, "nc", "jq")
	root := t.TempDir()
	vms, ro := filepath.Join(root, "vms"), filepath.Join(root, "ro")
	for _, d := range []string{vms, ro} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	status := filepath.Join(root, "status.sock")
	// The read-only sockets live outside the VMs' directories, so that
	// their removal at retirement is the proxy's doing, not rm -rf's.
	// --retire-after is far beyond every wait here: a console that
	// retires does so because its directory went, not on the clock.
	proxy := Start(t, nil, binary, "--upstream", "unix:"+vms+"/*/serial.sock", "--listen", "{dir}/console.sock",
		"--listen-ro", ro+"/{name}.sock", "--status", status, "--retire-after", "10m")
	WaitFor(t, "the status socket", func() bool { _, err := os.Stat(status); return err == nil })

	names := []string{"vm1", "vm2", "vm3"}
	sock := func(name string) string { return filepath.Join(vms, name, "console.sock") }
	qemu := make([]*Proc, len(names))
	for i, name := range names {
		if err := os.Mkdir(filepath.Join(vms, name), 0o700); err != nil {
			t.Fatal(err)
		}
		qemu[i] = startNamedGuest(t, name, filepath.Join(vms, name, "serial.sock"))
	}

	// The three boot at once; attach --until waits for each one's shell.
	waits := make([]*Proc, len(names))
	for i, name := range names {
		WaitFor(t, name+"'s client socket", func() bool { _, err := os.Stat(sock(name)); return err == nil })
		waits[i] = Start(t, nil, binary, "attach", "--read-only", "--until", guestPrompt, "--timeout", bootTimeout.String(), sock(name))
	}
	for i, w := range waits {
		if code := w.Wait(t); code != 0 {
			t.Fatalf("%s: attach --until the prompt: exit %d: %s; QEMU: %s; proxy: %s", names[i], code, w.Stderr, qemu[i].Stderr, proxy.Stderr)
		}
	}

	// A late client, found by name in the status document, gets its own
	// guest's boot replayed: the kernel's start, its command line naming
	// this guest (at least once; see cmdlineRE) and no other, the banner,
	// the prompt.
	for _, name := range names {
		late := Start(t, nil, binary, "attach", "--status", status, "--read-only", "--until", guestPrompt, "--timeout", "60s", name)
		if code := late.Wait(t); code != 0 {
			t.Fatalf("%s: a late attach --status: exit %d: %s", name, code, late.Stderr)
		}
		out := late.Stdout.String()
		boot, banner := bootRE.FindStringIndex(out), bannerRE.FindStringIndex(out)
		if boot == nil || banner == nil || boot[0] > banner[0] {
			t.Fatalf("%s: the late client's replay has no kernel boot before the banner: %q", name, out[:min(len(out), 500)])
		}
		var seen []string
		for _, m := range cmdlineRE.FindAllStringSubmatch(out, -1) {
			seen = append(seen, m[1])
		}
		if len(seen) == 0 || slices.ContainsFunc(seen, func(s string) bool { return s != name }) {
			t.Errorf("%s: the replay's kernel command lines name %q, want %s alone; the replay begins %q", name, seen, name, out[:min(len(out), 1000)])
		}
	}

	// Typing: a read-write client on each console runs a sum of its own;
	// each answer appears on its own console only. A second command on
	// each, answered after the first, fences the check: input sent to the
	// wrong guest would have been answered there before it.
	clients := make([]*console, len(names))
	for i, name := range names {
		clients[i] = attach(t, sock(name))
	}
	typeSums := func(idx ...int) []*regexp.Regexp {
		t.Helper()
		answers := make([]*regexp.Regexp, len(names))
		for _, i := range idx {
			cmd, answer := sum()
			answers[i] = answer
			if _, err := clients[i].conn.Write([]byte(cmd)); err != nil {
				t.Fatalf("%s: type: %v", names[i], err)
			}
		}
		for _, i := range idx {
			clients[i].waitFor(answers[i], 1, 60*time.Second)
		}
		return answers
	}
	all := []int{0, 1, 2}
	first := typeSums(all...)
	typeSums(all...)
	for i, c := range clients {
		for j, answer := range first {
			if n := len(answer.FindAllIndex(c.got, -1)); (i == j && n != 1) || (i != j && n != 0) {
				t.Errorf("%s's console shows %s's answer %d times", names[i], names[j], n)
			}
		}
	}

	// Guest 2 dies and its directory goes: its console retires at once.
	view := Start(t, nil, binary, "attach", "--read-only", filepath.Join(ro, "vm2.sock"))
	WaitFor(t, "vm2's read-only client to get the replay", func() bool { return strings.Contains(view.Stdout.String(), banner) })
	qemu[1].Cmd.Process.Kill()
	qemu[1].Wait(t)
	clients[1].waitFor(lostRE, 1, 30*time.Second)
	removed := time.Now()
	if err := os.RemoveAll(filepath.Join(vms, "vm2")); err != nil {
		t.Fatal(err)
	}
	rest := readToEOF(t, clients[1], 10*time.Second)
	t.Logf("vm2's client closed %v after its directory was removed", time.Since(removed).Round(time.Millisecond))
	if !strings.HasSuffix(rest, retiredNotice) {
		t.Errorf("vm2's read-write client's last bytes before EOF: %q, want the retired notice", rest[max(0, len(rest)-200):])
	}
	if code := view.Wait(t); code != 1 {
		t.Errorf("vm2's attach: exit %d, want 1", code)
	}
	oneLine(t, view, "consoleproxy attach: connection closed: console retired")
	if out := view.Stdout.String(); !strings.HasSuffix(out, retiredNotice) {
		t.Errorf("vm2's attach printed %q last, want the retired notice", out[max(0, len(out)-200):])
	}
	WaitFor(t, "vm2's read-only socket to be removed", func() bool {
		_, err := os.Lstat(filepath.Join(ro, "vm2.sock"))
		return errors.Is(err, os.ErrNotExist)
	})
	for _, name := range []string{"vm1", "vm3"} {
		for _, p := range []string{sock(name), filepath.Join(ro, name+".sock")} {
			if _, err := os.Stat(p); err != nil {
				t.Errorf("%s's socket after vm2 retired: %v", name, err)
			}
		}
	}
	doc := waitStatus(t, status, "vm2 gone from the status document", func(d statusDoc) bool { return len(d.Consoles) == 2 })
	for i, name := range []string{"vm1", "vm3"} {
		if c := doc.Consoles[i]; c.Name != name || !c.UpstreamUp || c.Upstream != "unix:"+filepath.Join(vms, name, "serial.sock") {
			t.Errorf("status console %d: %+v, want %s, up", i, c, name)
		}
	}
	if log := proxy.Stderr.String(); !regexp.MustCompile(`console retired: its socket directory is gone: console=vm2`).MatchString(log) {
		t.Errorf("the daemon did not log vm2's retirement:\n%s", log)
	}

	// The others stream on, unaware.
	typeSums(0, 2)
	for _, i := range []int{0, 2} {
		if got := string(clients[i].got); strings.Contains(got, retiredNotice) || lostRE.MatchString(got) {
			t.Errorf("%s's client saw vm2's end: %q", names[i], got[max(0, len(got)-300):])
		}
	}
}

// readToEOF reads what is left until the proxy closes the connection and
// returns it; anything but a clean EOF within timeout fails the test.
func readToEOF(t *testing.T, c *console, timeout time.Duration) string {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	rest, err := io.ReadAll(c.conn)
	c.got = append(c.got, rest...)
	if err != nil {
		t.Fatalf("the connection did not end within %v: %v; received %q", timeout, err, rest[max(0, len(rest)-300):])
	}
	return string(rest)
}
