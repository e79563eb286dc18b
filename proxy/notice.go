package proxy

import "strconv"

// Notice texts, as the contract names them.
const (
	noticeConnected = "upstream connected"
	noticeRestarted = "restarted; history above is from the console log"
	noticeDenied    = "access denied"
	noticeRetired   = "console retired"
	noticePrefix    = "[consoleproxy] "
)

func noticeLost(reason string) string { return "upstream lost: " + reason }

func noticeDropped(n uint64) string { return strconv.FormatUint(n, 10) + " bytes dropped" }

func noticeTooMany(max int) string { return "too many clients (max " + strconv.Itoa(max) + ")" }

// notice frames text as a notice line. A notice always stands on a line of
// its own, so it starts with CRLF when the stream it joins is mid-line; CRLF
// rather than LF because clients are terminals in raw mode.
func notice(text string, atLineStart bool) []byte {
	b := make([]byte, 0, 2+len(noticePrefix)+len(text)+2)
	if !atLineStart {
		b = append(b, '\r', '\n')
	}
	b = append(b, noticePrefix...)
	b = append(b, text...)
	return append(b, '\r', '\n')
}
