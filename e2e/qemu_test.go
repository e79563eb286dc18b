package e2e

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// bootTimeout bounds one guest boot: about 4 s under TCG on this kind of
// machine, far more on a loaded one.
const bootTimeout = 180 * time.Second

const banner = "CONSOLEPROXY-GUEST-READY"

// guest returns the kernel and initramfs that scripts/guest-assets.sh
// prepares, skipping the test when QEMU or they are missing.
func guest(t *testing.T) (kernel, initrd string) {
	t.Helper()
	Need(t, "qemu-system-x86_64")
	dir := os.Getenv("CONSOLEPROXY_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join("..", ".cache", "guest")
	}
	kernel, initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initramfs.cpio.gz")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("guest assets missing (%v): run scripts/guest-assets.sh; .ci/run does", err)
		}
	}
	return kernel, initrd
}

// accel is KVM only where the CPU offers virtualisation to this machine;
// the /dev/kvm of nested software hypervisors fails or crawls.
func accel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	if regexp.MustCompile(`\b(vmx|svm)\b`).Match(b) {
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			return "kvm"
		}
	}
	return "tcg"
}

func startQEMU(t *testing.T, serial ...string) *Proc {
	t.Helper()
	kernel, initrd := guest(t)
	args := []string{"-accel", accel(), "-m", "256", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
		"-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1"}
	return Start(t, nil, "qemu-system-x86_64", append(args, serial...)...)
}

// console is a client of the proxy that keeps everything it received.
type console struct {
	t    *testing.T
	conn net.Conn
	got  []byte
}

func attach(t *testing.T, sock string) *console {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &console{t: t, conn: conn}
}

// waitFor reads until what it received matches re for the count-th time.
func (c *console) waitFor(re *regexp.Regexp, count int, timeout time.Duration) {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 32<<10)
	for len(re.FindAllIndex(c.got, -1)) < count {
		n, err := c.conn.Read(buf)
		c.got = append(c.got, buf[:n]...)
		if err != nil {
			c.t.Fatalf("waiting for %d× %s: %v; received %d bytes ending %q", count, re, err, len(c.got), c.got[max(0, len(c.got)-300):])
		}
	}
}

// sum returns a shell command and the line only its output contains.
func sum() (cmd string, answer *regexp.Regexp) {
	a, b := 100000+rand.IntN(800000), 100000+rand.IntN(800000)
	return fmt.Sprintf("echo $((%d+%d))\n", a, b), regexp.MustCompile(fmt.Sprintf(`\n%d\r?\n`, a+b))
}

var (
	bannerRE = regexp.MustCompile(banner)
	bootRE   = regexp.MustCompile(`Linux version \d`)
	lostRE   = regexp.MustCompile(`\[consoleproxy\] upstream lost: [^\r]*\r\n`)
)

func TestQEMUGuestOverASocket(t *testing.T) {
	guest(t)
	dir := t.TempDir()
	serial, sock, logPath := filepath.Join(dir, "serial.sock"), filepath.Join(dir, "console.sock"), filepath.Join(dir, "console.log")
	proxy := Start(t, nil, binary, "--upstream", "unix:"+serial, "--listen", sock, "--console-log", logPath)
	chardev := []string{"-chardev", "socket,id=s0,path=" + serial + ",server=on,wait=off", "-serial", "chardev:s0"}
	qemu := startQEMU(t, chardev...)

	// A client that connects after the banner gets the boot replayed.
	deadline := time.Now().Add(bootTimeout)
	for !bytes.Contains(fileContents(t, logPath), []byte(banner)) {
		if time.Now().After(deadline) {
			t.Fatalf("no banner in the console log; QEMU: %s; proxy: %s", qemu.Stderr, proxy.Stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	a, b := attach(t, sock), attach(t, sock)
	a.waitFor(bannerRE, 1, 30*time.Second)
	if i, j := bootRE.FindIndex(a.got), bannerRE.FindIndex(a.got); i == nil || i[0] > j[0] {
		t.Fatalf("the replay has no kernel boot before the banner: %q", a.got[:min(len(a.got), 500)])
	}

	// A command typed by one client runs; both see its output.
	cmd, answer := sum()
	a.conn.Write([]byte(cmd))
	a.waitFor(answer, 1, 60*time.Second)
	b.waitFor(answer, 1, 60*time.Second)
	// The log writer is a reader of its own, so it may lag the clients.
	WaitFor(t, "the boot and the answer in the console log", func() bool {
		log := fileContents(t, logPath)
		return bootRE.Match(log) && answer.Match(log)
	})

	// The VM dies and boots again on the same socket: the clients stay and
	// see the second boot.
	qemu.Cmd.Process.Kill()
	qemu.Wait(t)
	a.waitFor(lostRE, 1, 30*time.Second)
	startQEMU(t, chardev...)
	for _, c := range []*console{a, b} {
		c.waitFor(bannerRE, 2, bootTimeout)
		if n := len(bootRE.FindAllIndex(c.got, -1)); n != 2 {
			t.Errorf("a client saw %d boots, want 2", n)
		}
	}
	cmd, answer = sum()
	b.conn.Write([]byte(cmd))
	a.waitFor(answer, 1, 60*time.Second)
}

func TestQEMUGuestOverAPTY(t *testing.T) {
	guest(t)
	dir := t.TempDir()
	link, sock := filepath.Join(dir, "serial.pty"), filepath.Join(dir, "console.sock")
	bootOnPTY := func() *Proc {
		qemu := startQEMU(t, "-serial", "pty")
		re := regexp.MustCompile(`char device redirected to (/dev/pts/\d+)`)
		var pts string
		WaitFor(t, "QEMU to name its PTY", func() bool {
			m := re.FindStringSubmatch(qemu.Stdout.String() + qemu.Stderr.String())
			if m != nil {
				pts = m[1]
			}
			return m != nil
		})
		// A stable name for the current PTY, which the proxy follows.
		tmp := link + ".tmp"
		os.Remove(tmp)
		if err := os.Symlink(pts, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, link); err != nil {
			t.Fatal(err)
		}
		return qemu
	}
	qemu := bootOnPTY()
	Start(t, nil, binary, "--upstream", "pty:"+link, "--listen", sock)
	var a *console
	WaitFor(t, "the client socket", func() bool { _, err := os.Stat(sock); return err == nil })
	a = attach(t, sock)
	a.waitFor(bannerRE, 1, bootTimeout)
	cmd, answer := sum()
	a.conn.Write([]byte(cmd))
	a.waitFor(answer, 1, 60*time.Second)

	qemu.Cmd.Process.Kill()
	qemu.Wait(t)
	a.waitFor(lostRE, 1, 30*time.Second)
	bootOnPTY()
	a.waitFor(bannerRE, 2, bootTimeout)
	cmd, answer = sum()
	a.conn.Write([]byte(cmd))
	a.waitFor(answer, 1, 60*time.Second)
}

// guestPrompt is the guest shell's prompt after its banner: busybox sh as
// root in / prints "/ # ".
var guestPrompt = `(?s)` + banner + `.*# `

// TestQEMUGuestWithAttach boots the guest behind the proxy as a user
// would use it: `consoleproxy attach --until` waits for the shell's
// prompt, then attach in a terminal runs a command in the guest and
// detaches.
func TestQEMUGuestWithAttach(t *testing.T) {
	guest(t)
	dir := t.TempDir()
	serial, sock := filepath.Join(dir, "serial.sock"), filepath.Join(dir, "console.sock")
	Start(t, nil, binary, "--upstream", "unix:"+serial, "--listen", sock)
	WaitFor(t, "the client socket", func() bool { _, err := os.Stat(sock); return err == nil })
	startQEMU(t, "-chardev", "socket,id=s0,path="+serial+",server=on,wait=off", "-serial", "chardev:s0")

	wait := Start(t, nil, binary, "attach", "--read-only", "--until", guestPrompt, "--timeout", bootTimeout.String(), sock)
	if code := wait.Wait(t); code != 0 {
		t.Fatalf("attach --until the prompt: exit %d: %s", code, wait.Stderr)
	}
	if out := wait.Stdout.String(); !bootRE.MatchString(out) || !regexp.MustCompile(guestPrompt+`$`).MatchString(out) {
		t.Fatalf("attach --until printed no boot, or did not stop at the prompt: %q", out[max(0, len(out)-500):])
	}

	term, p, before := attachInTerminal(t, sock)
	cmd, answer := sum()
	// Enter is CR on a raw terminal; the guest's tty turns it into LF.
	term.typeKeys(t, strings.TrimSuffix(cmd, "\n")+"\r")
	WaitFor(t, "the guest's answer on the screen", func() bool { return answer.MatchString(term.screen.String()) })
	term.typeKeys(t, "\x1d")
	if code := p.Wait(t); code != 0 {
		t.Fatalf("exit %d after the escape; screen: %q", code, term.screen.String())
	}
	if after := term.settings(t); after != before {
		t.Errorf("terminal settings after the escape differ:\nbefore %+v\nafter  %+v", before, after)
	}
}
