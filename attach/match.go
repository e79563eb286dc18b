package attach

import "regexp"

// matchWindow bounds the output kept for matching --until: a match may
// span any number of reads, but not more than this many bytes. 64 KiB
// holds any prompt or log line a script waits for, many times over.
const matchWindow = 64 << 10

// matcher finds a regular expression in a stream that arrives in chunks
// of any size. It keeps the tail of the stream, so a match split across
// reads is found, and memory stays bounded whatever the stream's length.
type matcher struct {
	re   *regexp.Regexp
	tail []byte // the last bytes of the stream, at most matchWindow before a feed
}

// feed adds chunk to the stream. When the stream now matches, it returns
// how many bytes of chunk lead up to the end of the first match, so the
// caller can print output up to the match and no further; otherwise -1.
// The match is searched in the tail plus the whole chunk, so a chunk
// larger than the window cannot hide a match inside it.
func (m *matcher) feed(chunk []byte) int {
	m.tail = append(m.tail, chunk...)
	if loc := m.re.FindIndex(m.tail); loc != nil {
		start := len(m.tail) - len(chunk)
		// A match that ended before this chunk was found by an earlier
		// feed, which returned there; the earliest match therefore ends
		// inside chunk (or is empty, at its start).
		return max(loc[1]-start, 0)
	}
	if drop := len(m.tail) - matchWindow; drop > 0 {
		m.tail = append(m.tail[:0], m.tail[drop:]...)
	}
	return -1
}
