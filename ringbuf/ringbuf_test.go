package ringbuf

import (
	"bytes"
	"testing"
)

// model is the naive reference: it keeps every byte ever written.
type model struct {
	all  []byte
	size int
}

func (m *model) start() uint64 {
	if len(m.all) > m.size {
		return uint64(len(m.all) - m.size)
	}
	return 0
}

// lineStart is the newline rule written as plainly as possible.
func (m *model) lineStart(off uint64) uint64 {
	off = max(off, m.start())
	if off == 0 || off >= uint64(len(m.all)) {
		return off
	}
	if m.all[off-1] == '\n' {
		return off
	}
	end := min(off+LineSearchWindow, uint64(len(m.all)))
	for i := off; i < end; i++ {
		if m.all[i] == '\n' {
			return i + 1
		}
	}
	return off
}

func TestWriteReadWrap(t *testing.T) {
	r := New(8)
	r.Write([]byte("abcdef"))
	r.Write([]byte("ghij"))
	if got, want := r.Start(), uint64(2); got != want {
		t.Fatalf("Start = %d, want %d", got, want)
	}
	if got, want := r.End(), uint64(10); got != want {
		t.Fatalf("End = %d, want %d", got, want)
	}
	buf := make([]byte, 16)
	n, lost := r.ReadAt(buf, 0)
	if string(buf[:n]) != "cdefghij" || lost != 2 {
		t.Fatalf("ReadAt(0) = %q lost %d, want %q lost 2", buf[:n], lost, "cdefghij")
	}
	n, lost = r.ReadAt(buf[:3], 7)
	if string(buf[:n]) != "hij" || lost != 0 {
		t.Fatalf("ReadAt(7) = %q lost %d", buf[:n], lost)
	}
	if n, _ := r.ReadAt(buf, 10); n != 0 {
		t.Fatalf("ReadAt(End) copied %d bytes", n)
	}
	if b, ok := r.ByteAt(1); !ok || b != 'b' {
		t.Fatalf("ByteAt(Start-1) = %q, %v; want 'b', true", b, ok)
	}
	if _, ok := r.ByteAt(0); ok {
		t.Fatal("ByteAt(0) reported a byte that is gone")
	}
}

func TestWriteLargerThanRing(t *testing.T) {
	r := New(4)
	r.Write([]byte("12"))
	r.Write([]byte("abcdefg"))
	buf := make([]byte, 4)
	n, lost := r.ReadAt(buf, 0)
	if string(buf[:n]) != "defg" || lost != 5 {
		t.Fatalf("got %q lost %d, want %q lost 5", buf[:n], lost, "defg")
	}
	if b, ok := r.ByteAt(4); !ok || b != 'c' {
		t.Fatalf("ByteAt(Start-1) = %q, %v; want 'c', true", b, ok)
	}
}

func TestLineStart(t *testing.T) {
	r := New(16)
	r.Write([]byte("line1\nline2\nli"))
	for _, tc := range []struct {
		off, want uint64
	}{
		{0, 0},   // first byte of the history
		{6, 6},   // after a newline
		{2, 6},   // mid-line: next line
		{8, 12},  // mid-line: next line
		{13, 13}, // mid-line, no newline after it
		{14, 14}, // End
	} {
		if got := r.LineStart(tc.off); got != tc.want {
			t.Errorf("LineStart(%d) = %d, want %d", tc.off, got, tc.want)
		}
	}
	// After wrapping, the byte before Start decides.
	r = New(4)
	r.Write([]byte("ab\ncdef"))
	if got := r.LineStart(0); got != 3 {
		t.Errorf("wrapped at a line start: LineStart = %d, want 3", got)
	}
	r.Write([]byte("g"))
	if got := r.LineStart(0); got != 4 {
		t.Errorf("wrapped mid-line without newline: LineStart = %d, want Start 4", got)
	}
}

func TestLineStartWindow(t *testing.T) {
	r := New(3 * LineSearchWindow)
	r.Write([]byte("x"))
	r.Write(bytes.Repeat([]byte("y"), LineSearchWindow))
	r.Write([]byte("\nz")) // newline at offset 4097: the window from 1 is [1, 4097)
	if got := r.LineStart(1); got != 1 {
		t.Errorf("newline outside the window: LineStart = %d, want 1", got)
	}
	if got := r.LineStart(2); got != LineSearchWindow+2 {
		t.Errorf("newline at the window's edge: LineStart = %d, want %d", got, LineSearchWindow+2)
	}
}

func TestNewPanicsOnBadSize(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("New(0) did not panic")
		}
	}()
	New(0)
}

// FuzzRing drives a ring and the naive model with the same writes and
// compares every observable answer.
func FuzzRing(f *testing.F) {
	f.Add(uint8(5), []byte("hello\nworld\nthis is a ring\n"), []byte{3, 7, 1, 20, 0, 9})
	f.Add(uint8(1), []byte("a\nb\nc"), []byte{1, 1, 1})
	f.Add(uint8(64), bytes.Repeat([]byte("0123456789\n"), 40), []byte{200, 13, 255, 2})
	f.Fuzz(func(t *testing.T, sizeSeed uint8, data []byte, cuts []byte) {
		size := int(sizeSeed)%97 + 1
		r := New(size)
		m := &model{size: size}
		buf := make([]byte, size+3)
		if len(cuts) > 256 {
			cuts = cuts[:256]
		}
		for _, c := range cuts {
			n := min(int(c), len(data))
			chunk := data[:n]
			data = data[n:]
			r.Write(chunk)
			m.all = append(m.all, chunk...)

			if r.End() != uint64(len(m.all)) || r.Start() != m.start() {
				t.Fatalf("Start/End = %d/%d, model %d/%d", r.Start(), r.End(), m.start(), len(m.all))
			}
			// Every offset older than Start-1 behaves alike; probing two of
			// them keeps each round linear in the ring's size.
			for off := max(m.start(), 2) - 2; off <= r.End()+1; off++ {
				n, lost := r.ReadAt(buf, off)
				from := max(off, m.start())
				var want []byte
				if from < uint64(len(m.all)) {
					want = m.all[from:min(uint64(len(m.all)), from+uint64(len(buf)))]
				}
				if !bytes.Equal(buf[:n], want) {
					t.Fatalf("ReadAt(%d) = %q, want %q", off, buf[:n], want)
				}
				if wantLost := m.start() - min(off, m.start()); lost != wantLost {
					t.Fatalf("ReadAt(%d) lost %d, want %d", off, lost, wantLost)
				}
				if got, want := r.LineStart(off), m.lineStart(off); got != want {
					t.Fatalf("LineStart(%d) = %d, want %d", off, got, want)
				}
				b, ok := r.ByteAt(off)
				wantOK := off < uint64(len(m.all)) && (off >= m.start() || (m.start() > 0 && off == m.start()-1))
				if ok != wantOK || (ok && b != m.all[off]) {
					t.Fatalf("ByteAt(%d) = %q, %v; want ok=%v", off, b, ok, wantOK)
				}
			}
		}
	})
}

func BenchmarkWrite(b *testing.B) {
	r := New(1 << 20)
	chunk := bytes.Repeat([]byte("x"), 4096)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	for b.Loop() {
		r.Write(chunk)
	}
}

func BenchmarkReadAt(b *testing.B) {
	r := New(1 << 20)
	r.Write(bytes.Repeat([]byte("x"), 3<<19))
	buf := make([]byte, 64<<10)
	off := r.Start()
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		n, _ := r.ReadAt(buf, off)
		off += uint64(n)
		if off >= r.End() {
			off = r.Start()
		}
	}
}
