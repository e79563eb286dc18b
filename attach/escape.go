package attach

import (
	"fmt"
	"strings"
)

// DefaultEscape is Ctrl-], the byte that detaches an interactive session
// unless Options says otherwise: the key telnet and virsh console use, so
// hands that know one console client know this one. It is rarely needed
// inside a guest, unlike Ctrl-C, Ctrl-D or Ctrl-Z, which must reach it.
const DefaultEscape byte = 0x1d

// ParseEscape parses the --escape notation: "^X" for a control character
// (case-insensitive, "^?" for DEL), a single ASCII character as itself, or
// "none" for no escape at all, in which case none is true. It rejects ^@
// (NUL, the zero value, which Options reads as the default) and ^[ (ESC,
// which every arrow and function key sends, so the first arrow key would
// detach).
func ParseEscape(s string) (escape byte, none bool, err error) {
	switch {
	case s == "none":
		return 0, true, nil
	case len(s) == 2 && s[0] == '^':
		c := strings.ToUpper(s[1:])[0]
		switch {
		case c == '?':
			return 0x7f, false, nil
		case c == '@':
			return 0, false, fmt.Errorf("%q is NUL, which cannot be the escape", s)
		case c == '[':
			return 0, false, fmt.Errorf("%q is ESC, which every arrow key sends; pick another", s)
		case c > '@' && c <= '_':
			return c - '@', false, nil
		}
		return 0, false, fmt.Errorf("%q: after ^ want a letter or one of [\\]^_?", s)
	case len(s) == 1 && s[0] != 0 && s[0] != 0x1b && s[0] < 0x80:
		return s[0], false, nil
	}
	return 0, false, fmt.Errorf("%q is not ^X, a single ASCII character, or none", s)
}

// EscapeName is the notation ParseEscape reads for b, as the header line
// shows it: "^]" for a control character, the character itself otherwise.
func EscapeName(b byte) string {
	switch {
	case b == 0x7f:
		return "^?"
	case b < 0x20:
		return "^" + string(rune(b+'@'))
	}
	return string(rune(b))
}
