package status

import (
	"encoding/json"
	"io"
	"net"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/consoleproxy/consoleproxy/console"
	"github.com/consoleproxy/consoleproxy/proxy"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func keys(m map[string]any) []string {
	var k []string
	for key := range m {
		k = append(k, key)
	}
	slices.Sort(k)
	return k
}

func TestOneDocumentPerConnectionWithTheContractsNames(t *testing.T) {
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "status.sock"))
	if err != nil {
		t.Fatal(err)
	}
	connected := time.Now().Add(-3 * time.Second)
	doc := func() Document {
		return NewDocument("v1", 90*time.Second, []console.Stats{{
			Name: "vm1", Upstream: "unix:/run/vms/vm1/serial.sock", Listen: "/run/vms/vm1/console.sock",
			Stats: proxy.Stats{UpstreamUp: true, UpstreamConnects: 2, UpstreamBytes: 100, LogNotLogged: 7,
				Clients: []proxy.ClientStats{{ID: 1, Socket: "/run/vms/vm1/console.sock", PID: 42, UID: 1000, GID: 1000,
					Connected: connected, BytesOut: 10, BytesIn: 3, InputDiscarded: 1, Dropped: 5}}},
		}})
	}
	done := make(chan error, 1)
	go func() { done <- Serve(ln, nil, doc, nil) }()
	defer func() {
		ln.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	for range 2 { // each connection gets a document of its own
		c, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		b, err := io.ReadAll(c) // ends: the server closes
		c.Close()
		if err != nil || len(b) == 0 || b[len(b)-1] != '\n' {
			t.Fatalf("read %q, %v: want one document and a newline, then EOF", b, err)
		}
		var got map[string]any
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		if k := keys(got); !slices.Equal(k, []string{"consoles", "uptime_seconds", "version"}) {
			t.Errorf("document keys %q", k)
		}
		cons := got["consoles"].([]any)[0].(map[string]any)
		want := []string{"clients", "console_log", "listen", "listen_ro", "log_bytes_not_logged", "name", "upstream",
			"upstream_bytes", "upstream_connects", "upstream_up"}
		if k := keys(cons); !slices.Equal(k, want) {
			t.Errorf("console keys %q, want %q", k, want)
		}
		if cons["listen_ro"] != "" || cons["console_log"] != "" || cons["log_bytes_not_logged"] != 7.0 {
			t.Errorf("console %v", cons)
		}
		client := cons["clients"].([]any)[0].(map[string]any)
		want = []string{"bytes_in", "bytes_out", "connected_seconds", "dropped", "gid", "id", "input_discarded", "pid",
			"read_only", "socket", "uid"}
		if k := keys(client); !slices.Equal(k, want) {
			t.Errorf("client keys %q, want %q", k, want)
		}
		if s := client["connected_seconds"].(float64); s < 3 {
			t.Errorf("connected_seconds %v, want at least 3", s)
		}
	}
}
