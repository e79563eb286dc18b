package proxy

import (
	"bytes"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/consoleproxy/consoleproxy/unixsock"
)

func TestReadOnlySocketDiscardsInput(t *testing.T) {
	checkLeaks(t)
	p, vmm := startPair(t, Config{})
	ro, err := unixsock.Listen(filepath.Join(t.TempDir(), "ro.sock"), unixsock.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { p.ServeReadOnly(ro) })
	defer wg.Wait()
	defer p.Close()

	viewer, err := net.Dial("unix", ro.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer viewer.Close()
	feed(t, p, vmm, []byte("output\n"))
	readUntil(t, viewer, nil, "output", func(b []byte) bool { return bytes.Contains(b, []byte("output\n")) })
	viewer.Write([]byte("rm -rf /\n"))
	waitFor(t, "the viewer's input to be read and discarded", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for c := range p.clients {
			if c.readOnly && c.discarded.Load() == uint64(len("rm -rf /\n")) {
				return true
			}
		}
		return false
	})
	// A read-write client's input, sent after, reaches the VMM alone.
	rw := dial(t, p)
	rw.Write([]byte("ok\n"))
	waitFor(t, "the read-write input", func() bool { return bytes.Contains(vmm.Input(), []byte("ok\n")) })
	if in := vmm.Input(); string(in) != "ok\n" {
		t.Errorf("VMM received %q; the viewer's input must never reach it", in)
	}
}
