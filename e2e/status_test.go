package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// statusDoc is the status document as the contract lists it. Tests decode
// it with unknown fields refused, after jq has checked the exact key sets.
type statusDoc struct {
	Version       string          `json:"version"`
	UptimeSeconds float64         `json:"uptime_seconds"`
	Consoles      []statusConsole `json:"consoles"`
}

type statusConsole struct {
	Name              string         `json:"name"`
	Upstream          string         `json:"upstream"`
	UpstreamUp        bool           `json:"upstream_up"`
	UpstreamConnects  uint64         `json:"upstream_connects"`
	UpstreamBytes     uint64         `json:"upstream_bytes"`
	Listen            string         `json:"listen"`
	ListenRO          string         `json:"listen_ro"`
	ConsoleLog        string         `json:"console_log"`
	LogBytesNotLogged uint64         `json:"log_bytes_not_logged"`
	Clients           []statusClient `json:"clients"`
}

type statusClient struct {
	ID               uint64  `json:"id"`
	Socket           string  `json:"socket"`
	PID              int     `json:"pid"`
	UID              uint32  `json:"uid"`
	GID              uint32  `json:"gid"`
	ReadOnly         bool    `json:"read_only"`
	ConnectedSeconds float64 `json:"connected_seconds"`
	BytesOut         uint64  `json:"bytes_out"`
	BytesIn          uint64  `json:"bytes_in"`
	InputDiscarded   uint64  `json:"input_discarded"`
	Dropped          uint64  `json:"dropped"`
}

// The key sets and JSON types the contract gives: counts are integers
// (checked apart, since jq calls every number a number).
var (
	docKeys     = map[string]string{"version": "string", "uptime_seconds": "number", "consoles": "array"}
	consoleKeys = map[string]string{
		"name": "string", "upstream": "string", "upstream_up": "boolean", "upstream_connects": "number",
		"upstream_bytes": "number", "listen": "string", "listen_ro": "string", "console_log": "string",
		"log_bytes_not_logged": "number", "clients": "array",
	}
	clientKeys = map[string]string{
		"id": "number", "socket": "string", "pid": "number", "uid": "number", "gid": "number", "read_only": "boolean",
		"connected_seconds": "number", "bytes_out": "number", "bytes_in": "number", "input_discarded": "number", "dropped": "number",
	}
)

// jqShape is a jq program that prints the document's key sets with their
// types, and whether every count is a whole number.
const jqShape = `{doc: map_values(type), consoles: [.consoles[] | map_values(type)], clients: [.consoles[].clients[] | map_values(type)],
  integers: ([.consoles[] | (.upstream_connects, .upstream_bytes, .log_bytes_not_logged),
    (.clients[] | .id, .pid, .uid, .gid, .bytes_out, .bytes_in, .input_discarded, .dropped)] | all(. == floor and . >= 0))}`

// readStatus reads the status socket with nc, as a user would: nc must get
// one JSON document and a newline and end by itself, since the daemon
// closes the connection. jq then checks the document's shape: the exact
// key sets of the document, of each console and of each client, and that
// counts are integers.
func readStatus(t *testing.T, path string) (statusDoc, string) {
	t.Helper()
	nc := Start(t, nil, "nc", "-U", path)
	if code := nc.Wait(t); code != 0 {
		t.Fatalf("nc -U %s: exit %d: %s", path, code, nc.Stderr)
	}
	raw := nc.Stdout.String()
	if !strings.HasSuffix(raw, "}\n") || strings.Count(raw, "\n") != 1 {
		t.Fatalf("the status socket sent %q; want one JSON document and a newline", raw)
	}
	jq := Start(t, strings.NewReader(raw), "jq", "-c", jqShape)
	if code := jq.Wait(t); code != 0 {
		t.Fatalf("jq: exit %d: %s; the document: %s", code, jq.Stderr, raw)
	}
	var shape struct {
		Doc      map[string]string
		Consoles []map[string]string
		Clients  []map[string]string
		Integers bool
	}
	if err := json.Unmarshal([]byte(jq.Stdout.String()), &shape); err != nil {
		t.Fatalf("jq printed %q: %v", jq.Stdout, err)
	}
	if !maps.Equal(shape.Doc, docKeys) {
		t.Errorf("the document's keys and types are %v, want %v", shape.Doc, docKeys)
	}
	for _, c := range shape.Consoles {
		if !maps.Equal(c, consoleKeys) {
			t.Errorf("a console's keys and types are %v, want %v", c, consoleKeys)
		}
	}
	for _, c := range shape.Clients {
		if !maps.Equal(c, clientKeys) {
			t.Errorf("a client's keys and types are %v, want %v", c, clientKeys)
		}
	}
	if !shape.Integers {
		t.Errorf("a count is not a whole number: %s", raw)
	}
	var doc statusDoc
	dec := json.NewDecoder(strings.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("status document %s: %v", raw, err)
	}
	return doc, raw
}

// waitStatus reads the status document until cond holds.
func waitStatus(t *testing.T, path, what string, cond func(statusDoc) bool) statusDoc {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for {
		doc, raw := readStatus(t, path)
		if cond(doc) {
			return doc
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; the last status document: %s", what, raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStatusOneConsoleWithNcAndJq: in single mode, `nc -U status.sock |
// jq` shows the one console, named "", with its paths (those not
// configured ""), its upstream's counts, and nc's own connection as a
// client: its pid, uid, gid and exact byte counts.
func TestStatusOneConsoleWithNcAndJq(t *testing.T) {
	Need(t, "nc", "jq")
	dir := t.TempDir()
	status := filepath.Join(dir, "status.sock")
	sock, daemon, _ := startProxyIn(t, dir, "--status", status)
	if fi, err := os.Stat(status); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("status socket: %v, %v; want a socket with mode 0600 (--socket-mode's default)", fi, err)
	}

	// The pipeline as the README gives it.
	pipe := Start(t, nil, "sh", "-c", `nc -U "$1" | jq -c '[.consoles[] | {name, upstream_up}]'`, "sh", status)
	if code := pipe.Wait(t); code != 0 || pipe.Stdout.String() != `[{"name":"","upstream_up":true}]`+"\n" {
		t.Fatalf("nc -U status.sock | jq: exit %d, printed %q (stderr %q)", code, pipe.Stdout, pipe.Stderr)
	}

	const typed = "uname -a\n"
	const answer = "\r\nLinux guest 6.1.0 x86_64 GNU/Linux\r\n"
	client := Start(t, strings.NewReader(typed), "nc", "-U", sock)
	WaitFor(t, "the answer to nc", func() bool { return strings.Contains(client.Stdout.String(), answer) })
	received := uint64(len(client.Stdout.String()))
	if received != uint64(len(replay+answer)) {
		t.Fatalf("nc received %q", client.Stdout)
	}
	doc := waitStatus(t, status, "nc's bytes counted", func(d statusDoc) bool {
		return len(d.Consoles) == 1 && len(d.Consoles[0].Clients) == 1 && d.Consoles[0].Clients[0].BytesOut == received
	})
	if doc.Version == "" || doc.UptimeSeconds <= 0 {
		t.Errorf("version %q, uptime %v", doc.Version, doc.UptimeSeconds)
	}
	c := doc.Consoles[0]
	wantConsole := statusConsole{
		Name: "", Upstream: "unix:" + filepath.Join(dir, "vmm.sock"), UpstreamUp: true, UpstreamConnects: 1,
		UpstreamBytes: uint64(len("Linux version 6.1.0 (boot log)\nguest login: " + answer)),
		Listen:        sock, ListenRO: "", ConsoleLog: "", LogBytesNotLogged: 0,
	}
	cl := c.Clients[0]
	c.Clients = nil
	if !equalJSON(c, wantConsole) {
		t.Errorf("the console is\n%+v, want\n%+v", c, wantConsole)
	}
	wantClient := statusClient{
		ID: cl.ID, Socket: sock, PID: client.Cmd.Process.Pid, UID: uint32(os.Getuid()), GID: uint32(os.Getgid()),
		ConnectedSeconds: cl.ConnectedSeconds, BytesOut: received, BytesIn: uint64(len(typed)),
	}
	if cl != wantClient || cl.ConnectedSeconds <= 0 || cl.ConnectedSeconds > WaitTimeout.Seconds() {
		t.Errorf("nc's client entry is\n%+v, want\n%+v", cl, wantClient)
	}

	// The status socket is the daemon's, and goes with it.
	daemon.Cmd.Process.Signal(syscall.SIGTERM)
	if code := daemon.Wait(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM: %s", code, daemon.Stderr)
	}
	if _, err := os.Lstat(status); err == nil {
		t.Error("the status socket was left behind after SIGTERM")
	}
}

// equalJSON compares two values by their JSON encodings.
func equalJSON(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

// TestStatusManyConsolesWithNcAndJq: in host mode the document lists every
// console, sorted by name whatever the order they came in, with the
// pattern's match in each path, and each client with the socket it used.
func TestStatusManyConsolesWithNcAndJq(t *testing.T) {
	Need(t, "nc", "jq")
	root := t.TempDir()
	vms, ro, logs := filepath.Join(root, "vms"), filepath.Join(root, "ro"), filepath.Join(root, "logs")
	for _, d := range []string{vms, ro, logs} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// Created out of order, some before the daemon and some after.
	names := []string{"vm9", "b", "vm10", "a", "c"}
	startVM := func(name string) {
		t.Helper()
		if err := os.Mkdir(filepath.Join(vms, name), 0o700); err != nil {
			t.Fatal(err)
		}
		startVMM(t, filepath.Join(vms, name, "vmm.sock"))
	}
	for _, n := range names[:2] {
		startVM(n)
	}
	status := filepath.Join(root, "status.sock")
	Start(t, nil, binary, "--upstream", "unix:"+vms+"/*/vmm.sock", "--listen", "{dir}/console.sock",
		"--listen-ro", ro+"/{name}.sock", "--console-log", logs+"/{name}.log", "--status", status)
	WaitFor(t, "the status socket", func() bool { _, err := os.Stat(status); return err == nil })
	for _, n := range names[2:] {
		startVM(n)
	}
	sorted := slices.Sorted(slices.Values(names))
	doc := waitStatus(t, status, "every console up", func(d statusDoc) bool {
		up := 0
		for _, c := range d.Consoles {
			if c.UpstreamUp {
				up++
			}
		}
		return up == len(names)
	})
	var got []string
	for _, c := range doc.Consoles {
		got = append(got, c.Name)
	}
	if !slices.Equal(got, sorted) {
		t.Fatalf("consoles %q, want %q (sorted by name)", got, sorted)
	}

	// A read-only client of one console and a read-write one of another.
	Start(t, nil, "nc", "-U", ro+"/vm10.sock")
	Start(t, nil, "nc", "-U", vms+"/a/console.sock")
	doc = waitStatus(t, status, "the two clients", func(d statusDoc) bool {
		n := 0
		for _, c := range d.Consoles {
			n += len(c.Clients)
		}
		return n == 2
	})
	for _, c := range doc.Consoles {
		want := statusConsole{
			Name: c.Name, Upstream: "unix:" + filepath.Join(vms, c.Name, "vmm.sock"), UpstreamUp: true, UpstreamConnects: 1,
			UpstreamBytes: uint64(len("Linux version 6.1.0 (boot log)\nguest login: ")),
			Listen:        filepath.Join(vms, c.Name, "console.sock"), ListenRO: filepath.Join(ro, c.Name+".sock"),
			ConsoleLog: filepath.Join(logs, c.Name+".log"),
		}
		clients := c.Clients
		c.Clients = nil
		if !equalJSON(c, want) {
			t.Errorf("console %q is\n%+v, want\n%+v", c.Name, c, want)
		}
		switch c.Name {
		case "vm10":
			if len(clients) != 1 || clients[0].Socket != want.ListenRO || !clients[0].ReadOnly {
				t.Errorf("vm10's clients: %+v, want one read-only client of %s", clients, want.ListenRO)
			}
		case "a":
			if len(clients) != 1 || clients[0].Socket != want.Listen || clients[0].ReadOnly {
				t.Errorf("a's clients: %+v, want one read-write client of %s", clients, want.Listen)
			}
		default:
			if len(clients) != 0 {
				t.Errorf("%s's clients: %+v, want none", c.Name, clients)
			}
		}
	}
}

// TestStatusRefusesWhomAllowUIDRefuses: the status socket follows the
// client sockets' access rules; a refused peer gets nothing at all, and
// the refusal is logged with its uid.
func TestStatusRefusesWhomAllowUIDRefuses(t *testing.T) {
	Need(t, "nc", "jq")
	if os.Getuid() != 0 {
		t.Skip("running a client as another user needs root; CI runs as root")
	}
	for _, tc := range []struct {
		allow   string
		refused bool
	}{
		{"0", true},
		{fmt.Sprint(nobody), false},
	} {
		t.Run("allow-uid "+tc.allow, func(t *testing.T) {
			dir := t.TempDir()
			openToNobody(t, dir)
			status := filepath.Join(dir, "status.sock")
			_, daemon, _ := startProxyIn(t, dir, "--status", status, "--socket-mode", "0666", "--allow-uid", tc.allow)
			nc := startCredential(t, nobody, "nc", "-U", status)
			if code := nc.Wait(t); code != 0 {
				t.Fatalf("nc as nobody: exit %d: %s", code, nc.Stderr)
			}
			got := nc.Stdout.String()
			if !tc.refused {
				var doc statusDoc
				if err := json.Unmarshal([]byte(got), &doc); err != nil || len(doc.Consoles) != 1 {
					t.Fatalf("an allowed peer received %q (%v), want the document", got, err)
				}
				return
			}
			if got != "" {
				t.Errorf("a refused peer received %q, want nothing", got)
			}
			WaitFor(t, "the refusal in the log", func() bool {
				log := daemon.Stderr.String()
				return strings.Contains(log, "status refused: access denied") && strings.Contains(log, "uid=65534")
			})
			// Root is always allowed.
			if doc, _ := readStatus(t, status); len(doc.Consoles) != 1 {
				t.Errorf("root's status document: %+v", doc)
			}
		})
	}
}
