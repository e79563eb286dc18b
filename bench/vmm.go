package main

import (
	"net"
	"strconv"
	"sync"
	"time"
)

// The stream: lines of lineLen bytes. A pattern line holds the offset of
// its first byte in the pattern (echo lines are not counted), so a client
// can tell a gap or a duplicate from the bytes alone. An echo line,
// "E<seq>\n", answers one input byte, for round-trip times.
const lineLen = 16

// window is how far pattern offsets run before they wrap: the VMM writes
// from one precomputed window, so that producing the stream costs nothing
// next to relaying it; clients check offsets modulo window.
const window = 16 << 20

var patternWindow = func() []byte {
	b := make([]byte, window+(1<<20)) // a chunk may run past the end
	for off := 0; off < len(b); off += lineLen {
		fillPattern(b[off:off+lineLen], uint64(off%window))
	}
	return b
}()

// fillPattern writes whole pattern lines for the pattern bytes [off,
// off+len(b)) into b.
func fillPattern(b []byte, off uint64) {
	for i := 0; i+lineLen <= len(b); i += lineLen {
		v := off + uint64(i)
		for d := lineLen - 2; d >= 0; d-- {
			b[i+d] = byte('0' + v%10)
			v /= 10
		}
		b[i+lineLen-1] = '\n'
	}
}

func echoLine(seq uint64) []byte {
	b := []byte("E00000000000000\n")
	s := strconv.FormatUint(seq, 10)
	copy(b[lineLen-1-len(s):], s)
	return b
}

// vmm is a fake VMM console socket: it serves each connection the stream,
// flooding (rate 0) or paced at rate bytes per second, and answers each
// input byte with an echo line as soon as the chunk being written, if any,
// is out: a guest's UART echo does not wait for its next line of output.
type vmm struct {
	ln    net.Listener
	rate  int
	chunk int
	limit uint64        // pattern bytes per connection; 0 streams until stopped
	begin chan struct{} // closed when the clients are in place
	quiet chan struct{} // closed to end the stream: only echoes from then on
	stop  chan struct{}
	wg    sync.WaitGroup
}

func startVMM(path string, rate, chunk int, limit uint64) (*vmm, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	v := &vmm{ln: ln, rate: rate, chunk: chunk, limit: limit, begin: make(chan struct{}), quiet: make(chan struct{}), stop: make(chan struct{})}
	v.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			v.wg.Go(func() { v.serve(c) })
		}
	})
	return v, nil
}

func (v *vmm) close() {
	close(v.stop)
	v.ln.Close()
	v.wg.Wait()
}

func (v *vmm) serve(c net.Conn) {
	defer c.Close()
	echoes := make(chan byte, 4096)
	v.wg.Go(func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			for _, b := range buf[:n] {
				select {
				case echoes <- b:
				default:
				}
			}
			if err != nil {
				return
			}
		}
	})
	go func() { <-v.stop; c.Close() }()
	if v.rate < 0 { // connected and silent
		<-v.stop
		return
	}
	select {
	case <-v.begin:
	case <-v.stop:
		return
	}
	var off uint64
	start := time.Now()
	var seq uint64
	echo := func() error {
		seq++
		_, err := c.Write(echoLine(seq))
		return err
	}
	pace := time.NewTimer(0)
	defer pace.Stop()
	quiet := v.quiet // nil once the stream is over
	for {
		// Echo lines go out as soon as the input arrives, between chunks.
		for drained := false; !drained; {
			select {
			case <-echoes:
				if echo() != nil {
					return
				}
			default:
				drained = true
			}
		}
		over := quiet == nil || v.limit > 0 && off >= v.limit
		var wait time.Duration
		if !over && v.rate > 0 {
			due := time.Duration(float64(off) / float64(v.rate) * float64(time.Second))
			wait = due - time.Since(start)
		}
		if over || wait > 0 {
			// Wait for the next chunk's time, or for ever once the stream
			// is over, answering input meanwhile.
			var tick <-chan time.Time
			if !over {
				pace.Reset(wait)
				tick = pace.C
			}
			select {
			case <-v.stop:
				return
			case <-quiet:
				quiet = nil
			case <-echoes:
				if echo() != nil {
					return
				}
			case <-tick:
			}
			pace.Stop()
			continue
		}
		select {
		case <-v.stop:
			return
		case <-quiet:
			quiet = nil
			continue
		default:
		}
		at := off % window
		if _, err := c.Write(patternWindow[at : at+uint64(v.chunk)]); err != nil {
			return
		}
		off += uint64(v.chunk)
	}
}
