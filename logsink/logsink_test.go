package logsink

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// stream returns n bytes of console-like output: numbered lines of varying
// length, with an occasional line longer than CutWindow.
func stream(n int) []byte {
	var b []byte
	for i := 0; len(b) < n; i++ {
		line := fmt.Sprintf("line %d %s", i, strings.Repeat("x", i%97))
		if i%500 == 499 {
			line += strings.Repeat("y", 2*CutWindow)
		}
		b = append(b, line...)
		b = append(b, '\n')
	}
	return b[:n]
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeInChunks writes data in pieces of varying size, as the log writer
// does.
func writeInChunks(t *testing.T, l *Log, data []byte) {
	t.Helper()
	for i, size := 0, 1; len(data) > 0; i, size = i+1, size*7%65521+1 {
		n := min(size, len(data))
		if w, err := l.Write(data[:n]); err != nil || w != n {
			t.Fatalf("Write = %d, %v; want %d", w, err, n)
		}
		data = data[n:]
	}
}

func TestRotationKeepsTheTailExactly(t *testing.T) {
	const maxSize, maxFiles = 64 << 10, 3
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := Open(path, Options{MaxSize: maxSize, MaxFiles: maxFiles})
	if err != nil {
		t.Fatal(err)
	}
	data := stream(5 << 20)
	writeInChunks(t, l, data)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	var all []byte
	for k := maxFiles; k >= 1; k-- {
		b := readFile(t, fmt.Sprintf("%s.%d", path, k))
		if len(b) > maxSize {
			t.Errorf("%s.%d holds %d bytes, more than %d", path, k, len(b), maxSize)
		}
		// A cut falls after a newline whenever one is within the window
		// before the limit: either the file ends with one, or the window
		// has none (the cut is exactly at the limit).
		if b[len(b)-1] != '\n' {
			if len(b) != maxSize || bytes.Contains(b[maxSize-CutWindow:], []byte("\n")) {
				t.Errorf("%s.%d (%d bytes) was not cut after the last newline near the limit", path, k, len(b))
			}
		}
		all = append(all, b...)
	}
	all = append(all, readFile(t, path)...)
	if _, err := os.Stat(fmt.Sprintf("%s.%d", path, maxFiles+1)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s.%d exists: %v", path, maxFiles+1, err)
	}
	if !bytes.HasSuffix(data, all) {
		t.Fatalf("the %d bytes of PATH.3 … PATH are not the tail of the stream", len(all))
	}
	if len(all) < maxFiles*(maxSize-2*CutWindow) {
		t.Errorf("only %d bytes kept in %d files of %d", len(all), maxFiles+1, maxSize)
	}
}

func TestRotationCutsAtTheLimitWithoutNewline(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := Open(path, Options{MaxSize: 10000, MaxFiles: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	data := bytes.Repeat([]byte("z"), 15000)
	data[100] = '\n' // too far before the limit to cut at
	writeInChunks(t, l, data)
	if a, b := readFile(t, path+".1"), readFile(t, path); len(a) != 10000 || !bytes.Equal(append(a, b...), data) {
		t.Errorf("PATH.1 %d bytes, PATH %d bytes; want an exact cut at 10000 and no loss", len(a), len(b))
	}
}

func TestRotationCutsAtTheFilesOwnNewline(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := Open(path, Options{MaxSize: 10000, MaxFiles: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	first := append(bytes.Repeat([]byte("a"), 9000-1), '\n')
	second := bytes.Repeat([]byte("b"), 3000) // no newline in it
	// The rule applies to the write that would pass the limit, so the
	// second part is one write.
	writeInChunks(t, l, first)
	if n, err := l.Write(second); n != len(second) || err != nil {
		t.Fatal(n, err)
	}
	if a, b := readFile(t, path+".1"), readFile(t, path); !bytes.Equal(a, first) || !bytes.Equal(b, second) {
		t.Errorf("PATH.1 %d bytes, PATH %d bytes; want the cut at the file's own newline (9000, 3000)", len(a), len(b))
	}
}

func TestMaxFilesZeroStartsAnew(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	l, err := Open(path, Options{MaxSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	writeInChunks(t, l, stream(20000))
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || len(readFile(t, path)) > 4096 {
		t.Errorf("with MaxFiles 0: %d files, PATH %d bytes", len(entries), len(readFile(t, path)))
	}
}

func TestModeIsExplicitWhateverTheUmask(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	path := filepath.Join(t.TempDir(), "console.log")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != FileMode {
		t.Errorf("mode %v, want %v", fi.Mode().Perm(), os.FileMode(FileMode))
	}
}

func TestSymlinkIsRefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("precious\n"), 0o600)
	link := filepath.Join(dir, "console.log")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link, Options{}); !errors.Is(err, ErrSymlink) {
		t.Errorf("Open(symlink) = %v, want ErrSymlink", err)
	}
	if _, err := ReadTail(link, 100, false); !errors.Is(err, ErrSymlink) {
		t.Errorf("ReadTail(symlink) = %v, want ErrSymlink", err)
	}
	if b := readFile(t, target); string(b) != "precious\n" {
		t.Errorf("target changed: %q", b)
	}
	if _, err := Open(dir, Options{}); err == nil {
		t.Error("Open(directory) succeeded")
	}
}

func TestTimestampsPrefixEveryLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	now := time.Date(2026, 11, 23, 19, 4, 5, 678_900_000, time.FixedZone("CET", 3600))
	l, err := Open(path, Options{Timestamps: true, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"boot", "ing\nsecond line\n", "", "third\n\n"} {
		if n, err := l.Write([]byte(w)); n != len(w) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", w, n, err)
		}
	}
	l.Close()
	ts := "2026-11-23T18:04:05.678Z "
	want := ts + "booting\n" + ts + "second line\n" + ts + "third\n" + ts + "\n"
	if got := string(readFile(t, path)); got != want {
		t.Errorf("log = %q, want %q", got, want)
	}
	if got, _ := ReadTail(path, 1000, true); string(got) != "booting\nsecond line\nthird\n\n" {
		t.Errorf("ReadTail stripped = %q", got)
	}
}

// failingSeam fails every write while fail is set, after writing part of it,
// as a disk that fills up mid-write does.
type failingSeam struct {
	f    *os.File
	fail *bool
}

func (s failingSeam) Write(p []byte) (int, error) {
	if *s.fail {
		n, _ := s.f.Write(p[:len(p)/2])
		return n, &os.PathError{Op: "write", Path: s.f.Name(), Err: syscall.ENOSPC}
	}
	return s.f.Write(p)
}

func TestFailedWriteLeavesNoPartialBytes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	fail := false
	l, err := Open(path, Options{Timestamps: true, Seam: func(f *os.File) io.Writer { return failingSeam{f, &fail} }})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.Write([]byte("one\n"))
	fail = true
	if n, err := l.Write([]byte("two\nthree\n")); n != 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("failing Write = %d, %v; want 0, ENOSPC", n, err)
	}
	fail = false
	l.Write([]byte("two\nthree\n"))
	got, _ := ReadTail(path, 1000, true)
	if string(got) != "one\ntwo\nthree\n" {
		t.Errorf("log after a failed write and a retry = %q", got)
	}
}

func TestReopenAfterExternalRename(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.Write([]byte("before\n"))
	if err := os.Rename(path, path+".old"); err != nil {
		t.Fatal(err)
	}
	l.Write([]byte("still old\n"))
	if err := l.Reopen(); err != nil {
		t.Fatal(err)
	}
	l.Write([]byte("after\n"))
	if a, b := readFile(t, path+".old"), readFile(t, path); string(a) != "before\nstill old\n" || string(b) != "after\n" {
		t.Errorf("old %q, new %q", a, b)
	}
}

func TestReadTailSpansTheRotatedFileAndStartsALine(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	os.WriteFile(path+".1", []byte("old 1\nold 2\nold 3\n"), 0o640)
	os.WriteFile(path, []byte("new 1\nnew"), 0o640)
	for _, tc := range []struct {
		max  int
		want string
	}{
		// PATH.1 + PATH is "old 1\nold 2\nold 3\nnew 1\nnew" (27 bytes).
		{1000, "old 1\nold 2\nold 3\nnew 1\nnew"},
		{18, "old 3\nnew 1\nnew"}, // cut mid-line in PATH.1: the next line
		{15, "old 3\nnew 1\nnew"}, // cut at a line start
		{10, "new 1\nnew"},        // PATH.1's last newline, then PATH
		{9, "new 1\nnew"},         // exactly PATH
		{2, "ew"},                 // cut with no newline after it
		{0, ""},
	} {
		got, err := ReadTail(path, tc.max, false)
		if err != nil || string(got) != tc.want {
			t.Errorf("ReadTail(%d) = %q, %v; want %q", tc.max, got, err, tc.want)
		}
	}
	if got, err := ReadTail(filepath.Join(dir, "missing.log"), 100, false); err != nil || len(got) != 0 {
		t.Errorf("ReadTail(missing) = %q, %v", got, err)
	}
}

// A rotation interrupted after PATH was linked to PATH.1 (a crash, or a
// failure to create the new file) leaves both names on one file. The next
// rotation must finish it, not shift the same bytes into a second rotated
// file; seeding must not read them twice.
func TestInterruptedRotationIsFinishedNotRepeated(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "console.log")
	// The interrupted state: PATH.1 was shifted to PATH.2, PATH linked to
	// PATH.1, and the new PATH never created.
	os.WriteFile(path+".2", []byte("old\n"), 0o640)
	os.WriteFile(path, []byte("current line\n"), 0o640)
	if err := os.Link(path, path+".1"); err != nil {
		t.Fatal(err)
	}

	if got, _ := ReadTail(path, 1000, false); string(got) != "current line\n" {
		t.Errorf("ReadTail read the linked file twice: %q", got)
	}
	l, err := Open(path, Options{MaxSize: 16, MaxFiles: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := l.Write([]byte("next line\n")); err != nil {
		t.Fatal(err)
	}
	got := string(readFile(t, path+".2")) + string(readFile(t, path+".1")) + string(readFile(t, path))
	if want := "old\ncurrent line\nnext line\n"; got != want {
		t.Errorf("PATH.2 PATH.1 PATH = %q, want %q", got, want)
	}
	if _, err := os.Stat(path + ".3"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the interrupted rotation was repeated: PATH.3 exists (%v)", err)
	}
}
