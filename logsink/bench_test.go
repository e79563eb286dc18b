package logsink

import (
	"path/filepath"
	"testing"
)

// BenchmarkWriteLine measures the hot path: one console line per Write, as
// the log writer issues when the VM prints slowly. The Log looks at its
// file (fstat) only every lookInterval or near the size limit, so this is
// one write(2) per line plus a clock read.
func BenchmarkWriteLine(b *testing.B) {
	for _, bc := range []struct {
		name string
		opts Options
	}{
		{"plain", Options{}},
		{"rotating", Options{MaxSize: 16 << 20, MaxFiles: 2}},
		{"timestamps", Options{Timestamps: true}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "console.log"), bc.opts)
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			line := []byte("[    1.234567] systemd[1]: Started Journal Service and some more text here.\n")
			b.SetBytes(int64(len(line)))
			for b.Loop() {
				if _, err := l.Write(line); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
