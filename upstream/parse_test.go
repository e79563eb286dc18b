package upstream

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseUpstream(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "vmm.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, nil, 0o600)
	for _, tc := range []struct{ spec, want string }{
		{"unix:/run/vm/serial.sock", "unix:/run/vm/serial.sock"},
		{"pty:/dev/pts/3", "pty:/dev/pts/3"},
		{"listen:/run/vm/serial.sock", "listen:/run/vm/serial.sock"},
		{"tcp:127.0.0.1:4555", "tcp:127.0.0.1:4555"},
		{"tcp:[::1]:4555", "tcp:[::1]:4555"},
		{sock, "unix:" + sock},
		{"/dev/null", "pty:/dev/null"}, // a character device
	} {
		u, err := ParseUpstream(tc.spec)
		if err != nil || u.String() != tc.want {
			t.Errorf("ParseUpstream(%q) = %v, %v; want %s", tc.spec, u, err, tc.want)
		}
	}
	for _, spec := range []string{"", "ftp:x", "unix:", "pty:", "tcp:host", "tcp::80", "tcp:h:0", "tcp:h:http",
		"listen:/" + strings.Repeat("x", 107), regular, filepath.Join(dir, "missing"), dir} {
		if u, err := ParseUpstream(spec); err == nil {
			t.Errorf("ParseUpstream(%q) = %v, want an error", spec, u)
		}
	}
}
