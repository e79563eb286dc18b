package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/unixsock"
)

// fakeVMM stands in for a VMM's console socket: it prints a login prompt
// and greets whoever logs in.
func fakeVMM(path string) net.Listener {
	l, err := net.Listen("unix", path)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("Linux version 6.1.0\nguest login: "))
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "\nWelcome, %s", line)
	}()
	return l
}

// readUntil reads r until what it has read contains want.
func readUntil(r *proxy.Reader, want string) string {
	var got []byte
	buf := make([]byte, 1024)
	for !bytes.Contains(got, []byte(want)) {
		n, err := r.Read(buf)
		if err != nil {
			log.Fatal(err)
		}
		got = append(got, buf[:n]...)
	}
	return string(got)
}

// A program can run a console proxy in-process: a Reader receives the
// replay and then live output, exactly as a socket client does, and
// WriteInput types into the VM. Here, an agent that logs in.
func Example() {
	dir, _ := os.MkdirTemp("", "consoleproxy-example")
	defer os.RemoveAll(dir)
	vmm := fakeVMM(filepath.Join(dir, "serial.sock"))
	defer vmm.Close()

	p, err := proxy.New(proxy.Config{
		Upstream:       &proxy.UnixUpstream{Path: filepath.Join(dir, "serial.sock")},
		DisableNotices: true, // no [consoleproxy] lines in the stream
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	upstreamDone := make(chan error)
	go func() { upstreamDone <- p.RunUpstream(ctx) }()
	defer func() {
		cancel()
		<-upstreamDone
		p.Close()
	}()

	r, err := p.NewReader()
	if err != nil {
		log.Fatal(err)
	}
	defer r.Close()
	fmt.Print(readUntil(r, "login: "))
	if err := p.WriteInput([]byte("root\n")); err != nil {
		log.Fatal(err)
	}
	fmt.Println(strings.TrimSpace(readUntil(r, "Welcome, root")))
	// Output:
	// Linux version 6.1.0
	// guest login: Welcome, root
}

// Serve re-exports the console on a Unix socket for socat, nc and other
// tools; Listen creates the socket with its mode in effect before the path
// appears.
func ExampleProxy_Serve() {
	dir, _ := os.MkdirTemp("", "consoleproxy-example")
	defer os.RemoveAll(dir)
	vmm := fakeVMM(filepath.Join(dir, "serial.sock"))
	defer vmm.Close()

	p, err := proxy.New(proxy.Config{Upstream: &proxy.UnixUpstream{Path: filepath.Join(dir, "serial.sock")}})
	if err != nil {
		log.Fatal(err)
	}
	ln, err := unixsock.Listen(filepath.Join(dir, "console.sock"), unixsock.SocketOptions{Mode: 0o600})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	upstreamDone, serveDone := make(chan error), make(chan error)
	go func() { upstreamDone <- p.RunUpstream(ctx) }()
	go func() { serveDone <- p.Serve(ln) }()

	// A client, as socat would be.
	c, err := net.Dial("unix", filepath.Join(dir, "console.sock"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	got, _ := bufio.NewReader(c).ReadString(':')
	fmt.Println(strings.ReplaceAll(got, "\r\n", "\n"))

	// Stop: the upstream first, then drain and close the clients.
	cancel()
	<-upstreamDone
	p.Shutdown(context.Background())
	fmt.Println(<-serveDone)
	// Output:
	// [consoleproxy] upstream connected
	// Linux version 6.1.0
	// guest login:
	// proxy closed
}
