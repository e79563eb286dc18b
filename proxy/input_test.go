package proxy

import (
	"bytes"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// deafVMM accepts one connection and never reads from it, as a VMM whose
// guest has hung and stopped draining its UART.
type deafVMM struct {
	ln   net.Listener
	conn chan net.Conn
}

func startDeafVMM(t *testing.T, path string) *deafVMM {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	v := &deafVMM{ln: ln, conn: make(chan net.Conn, 1)}
	var wg sync.WaitGroup
	wg.Go(func() {
		c, err := ln.Accept()
		if err == nil {
			v.conn <- c
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		select {
		case c := <-v.conn:
			c.Close()
		default:
		}
	})
	return v
}

// within runs f and fails the test if it has not returned within
// waitTimeout: a call that must answer promptly.
func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(waitTimeout):
		t.Fatalf("%s blocked", what)
	}
}

func TestDeafVMMHoldsUpNoOne(t *testing.T) {
	checkLeaks(t)
	logs := &syncLog{}
	const clients = 3
	p, dir := startProxy(t, Config{MaxClients: clients, Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})})
	vmm := startDeafVMM(t, filepath.Join(dir, "vmm.sock"))
	waitFor(t, "the proxy to connect", func() bool { return p.Stats().UpstreamUp })

	// Every client types more than the queue and the kernel's socket
	// buffers hold together, then leaves.
	typed := bytes.Repeat([]byte("x"), 2*maxQueuedInput)
	for range clients {
		c := dial(t, p)
		within(t, "typing at a VMM that does not read", func() {
			if _, err := c.Write(typed); err != nil {
				t.Errorf("write: %v", err)
			}
		})
		c.Close()
	}
	// Those that left are released at once, so the table has room again.
	waitFor(t, "the clients that left to be released", func() bool { return p.clientCount() == 0 })
	within(t, "Stats", func() { p.Stats() })
	viewer := dial(t, p)
	got := readUntil(t, viewer, nil, "the replay", func(b []byte) bool { return bytes.HasSuffix(b, connectedNotice) })
	if string(got) != string(connectedNotice) {
		t.Errorf("a new client received %q, want the replay %q", got, connectedNotice)
	}
	waitFor(t, "the outage to be logged", func() bool { return strings.Contains(logs.String(), "not reading input") })

	// Once the VMM goes away, every byte typed is accounted for, as sent
	// or as discarded.
	vmm.ln.Close()
	(<-vmm.conn).Close()
	total := uint64(clients * len(typed))
	waitFor(t, "every typed byte to be counted as sent or discarded", func() bool {
		s := p.Stats()
		return s.BytesIn+s.InputDiscarded == total
	})
	if s := p.Stats(); s.InputDiscarded == 0 || s.BytesIn == 0 {
		t.Errorf("bytes in %d, discarded %d: want some of each", s.BytesIn, s.InputDiscarded)
	}
	if n := strings.Count(logs.String(), "not reading input"); n != 1 {
		t.Errorf("the outage was logged %d times, want once:\n%s", n, logs)
	}
}

func TestInputReachesTheVMMWholeAndInOrder(t *testing.T) {
	checkLeaks(t)
	p, dir := startProxy(t, Config{})
	vmm := startVMM(t, filepath.Join(dir, "vmm.sock"))
	waitFor(t, "the proxy to connect", func() bool { return p.Stats().UpstreamUp })
	var want []byte
	for i := range 200 {
		b := []byte(strings.Repeat(string(rune('a'+i%26)), 1+i%50))
		want = append(want, b...)
		if err := p.WriteInput(b); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the input to reach the VMM", func() bool { return len(vmm.Input()) == len(want) })
	if got := vmm.Input(); !bytes.Equal(got, want) {
		t.Errorf("the VMM received %q, want %q", got, want)
	}
}
