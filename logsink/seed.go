package logsink

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// ReadTail returns up to max bytes of console output from the end of the
// log at path, continuing into path.1 when path holds less, so that a
// restarted proxy can replay the history from before its restart. With
// timestamps set, the timestamps Options.Timestamps adds are removed. When
// the result does not begin at the start of the history it begins at a line
// start: after the first newline within CutWindow bytes, if there is one.
// Missing files give an empty result; anything else that is not a regular
// file is refused (ErrSymlink, ErrNotRegular) without opening it in a way
// that blocks.
func ReadTail(path string, max int, timestamps bool) ([]byte, error) {
	if max <= 0 {
		return nil, nil
	}
	// One byte more than wanted tells whether the result was cut, and if so
	// whether it was cut at a line start.
	cur, err := readTail(path, max+1)
	if err != nil {
		return nil, err
	}
	data := cur
	// PATH.1 may be PATH itself, left by an interrupted rotation.
	if len(cur) < max+1 && !sameFile(path, path+".1") {
		prev, err := readTail(path+".1", max+1-len(cur))
		if err != nil {
			return nil, err
		}
		data = append(prev, cur...)
	}
	if len(data) == max+1 {
		before := data[0]
		data = data[1:]
		if before != '\n' {
			if i := bytes.IndexByte(data[:min(len(data), CutWindow)], '\n'); i >= 0 {
				data = data[i+1:]
			}
		}
	}
	if timestamps {
		data = stripTimestamps(data)
	}
	return data, nil
}

// readTail reads up to n bytes from the end of the file at path. Like
// Open, it refuses anything that is not a regular file without blocking on
// it.
func readTail(path string, n int) ([]byte, error) {
	f, err := openRegular(path, unix.O_RDONLY)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read console log: %w", err)
	}
	off := max(0, fi.Size()-int64(n))
	b := make([]byte, fi.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read console log %s: %w", path, err)
	}
	return b, nil
}

// stripTimestamps removes the timestamp prefix from every line that has
// one; lines without one (from a run without timestamps) are kept as they
// are.
func stripTimestamps(b []byte) []byte {
	out := b[:0]
	for len(b) > 0 {
		if isTimestamp(b) {
			b = b[TimestampLen:]
		}
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line = b[:i+1]
		}
		out = append(out, line...)
		b = b[len(line):]
	}
	return out
}

// isTimestamp reports whether b starts with "YYYY-MM-DDTHH:MM:SS.mmmZ ".
func isTimestamp(b []byte) bool {
	if len(b) < TimestampLen {
		return false
	}
	for i, want := range []byte(timestampLayout + " ") {
		c := b[i]
		switch want {
		case '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
			if c < '0' || c > '9' {
				return false
			}
		default:
			if c != want {
				return false
			}
		}
	}
	return true
}
