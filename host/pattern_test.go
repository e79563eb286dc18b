package host

import "testing"

func TestParsePattern(t *testing.T) {
	for _, tc := range []struct {
		in                           string
		parent, prefix, suffix, rest string
		name, entry, path            string
	}{
		{"/run/vms/*/serial.sock", "/run/vms", "", "", "serial.sock", "vm1", "vm1", "/run/vms/vm1/serial.sock"},
		{"/run/vc/vm/*/console.sock", "/run/vc/vm", "", "", "console.sock", "x", "x", "/run/vc/vm/x/console.sock"},
		{"/srv/consoles/vm-*.sock", "/srv/consoles", "vm-", ".sock", "", "7", "vm-7.sock", "/srv/consoles/vm-7.sock"},
		{"/*.sock", "/", "", ".sock", "", "a", "a.sock", "/a.sock"},
		{"vms/*/s", "vms", "", "", "s", "b", "b", "vms/b/s"},
	} {
		p, err := ParsePattern(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if p.Parent != tc.parent || p.Prefix != tc.prefix || p.Suffix != tc.suffix || p.Rest != tc.rest {
			t.Errorf("%s: %+v", tc.in, p)
		}
		if name, ok := p.Match(tc.entry); !ok || name != tc.name {
			t.Errorf("%s: Match(%q) = %q, %v; want %q", tc.in, tc.entry, name, ok, tc.name)
		}
		if got := p.Path(tc.name); got != tc.path {
			t.Errorf("%s: Path(%q) = %q, want %q", tc.in, tc.name, got, tc.path)
		}
		if got := p.String(); got != tc.in {
			t.Errorf("String() = %q, want %q", got, tc.in)
		}
	}
	for _, bad := range []string{"/run/*/*/s", "/a**"} {
		if _, err := ParsePattern(bad); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
	if _, err := ParsePattern("/run/vm1/serial.sock"); err != ErrNotPattern {
		t.Errorf("no '*': %v, want ErrNotPattern", err)
	}
	p, _ := ParsePattern("/srv/vm-*.sock")
	for _, entry := range []string{"vm-.sock", ".vm-1.sock", "other.sock", "vm-1.sockx"} {
		if name, ok := p.Match(entry); ok {
			t.Errorf("Match(%q) = %q, want no match", entry, name)
		}
	}
	for path, want := range map[string]string{"/srv/vm-7.sock": "7", "/srv/vm-7.sock/x": "", "/srv/a/vm-7.sock": "", "/srv/vm-.sock": ""} {
		if name, ok := p.MatchPath(path); name != want || ok != (want != "") {
			t.Errorf("MatchPath(%q) = %q, %v; want %q", path, name, ok, want)
		}
	}
	q, _ := ParsePattern("/run/vms/*/serial.sock")
	if name, ok := q.MatchPath("/run/vms/vm1/serial.sock"); !ok || name != "vm1" {
		t.Errorf("MatchPath = %q, %v", name, ok)
	}
	if _, ok := q.MatchPath("/run/vms/vm1/console.sock"); ok {
		t.Error("a path with another rest matched")
	}
	if got := Expand("{dir}/{name}.console.sock", "vm1", "/run/vms/vm1/serial.sock"); got != "/run/vms/vm1/vm1.console.sock" {
		t.Errorf("Expand = %q", got)
	}
}
