package upstream

import (
	"strings"
	"testing"
)

func FuzzParseUpstream(f *testing.F) {
	for _, s := range []string{"unix:/run/vm/serial.sock", "pty:/dev/pts/3", "listen:/x", "tcp:127.0.0.1:4555", "tcp:[::1]:1",
		"tcp:h:0", "unix:", "x:y", "", ":", "tcp::", "/dev/null", "unix:" + strings.Repeat("a", 120)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		u, err := ParseUpstream(spec)
		if err != nil {
			return
		}
		// A spec with a kind names the same upstream when printed again.
		again, err := ParseUpstream(u.String())
		if err != nil || again.String() != u.String() {
			t.Fatalf("ParseUpstream(%q) = %s, which parses to %v, %v", spec, u, again, err)
		}
		if p, ok := u.(pathWatcher); ok && len(p.watchPath()) == 0 {
			t.Fatalf("ParseUpstream(%q) has an empty path", spec)
		}
	})
}
