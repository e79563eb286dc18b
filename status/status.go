// Package status serves the status socket: each connection receives one
// JSON document describing every console, followed by a newline, and is
// closed, so that `nc -U status.sock | jq` works. Input is ignored.
//
// The document's field names are part of the user-facing contract; they
// are snake_case, and a path that is not configured is "".
package status

import (
	"encoding/json"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/consoleproxy/consoleproxy/console"
	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/warnlimit"
	"github.com/hashicorp/go-hclog"
)

// Accept retry timing: soon at first, then no more than once a second.
const (
	minRetry = 10 * time.Millisecond
	maxRetry = time.Second
)

// writeTimeout bounds the write of one document: a reader that does not
// read must not hold a goroutine for long.
const writeTimeout = time.Second

// Document is what a connection to the status socket receives.
type Document struct {
	Version       string    `json:"version"`
	UptimeSeconds float64   `json:"uptime_seconds"`
	Consoles      []Console `json:"consoles"`
}

// Console describes one console.
type Console struct {
	Name              string   `json:"name"`
	Upstream          string   `json:"upstream"`
	UpstreamUp        bool     `json:"upstream_up"`
	UpstreamConnects  uint64   `json:"upstream_connects"`
	UpstreamBytes     uint64   `json:"upstream_bytes"`
	Listen            string   `json:"listen"`
	ListenRO          string   `json:"listen_ro"`
	ConsoleLog        string   `json:"console_log"`
	LogBytesNotLogged uint64   `json:"log_bytes_not_logged"`
	Clients           []Client `json:"clients"`
}

// Client describes one connected client of a console.
type Client struct {
	ID               uint64  `json:"id"`
	Socket           string  `json:"socket"`
	PID              int32   `json:"pid"`
	UID              uint32  `json:"uid"`
	GID              uint32  `json:"gid"`
	ReadOnly         bool    `json:"read_only"`
	ConnectedSeconds float64 `json:"connected_seconds"`
	BytesOut         uint64  `json:"bytes_out"`
	BytesIn          uint64  `json:"bytes_in"`
	InputDiscarded   uint64  `json:"input_discarded"`
	Dropped          uint64  `json:"dropped"`
}

// NewDocument builds the document from the consoles' stats, in the order
// given (sorted by name by the caller).
func NewDocument(version string, uptime time.Duration, consoles []console.Stats) Document {
	now := time.Now()
	d := Document{Version: version, UptimeSeconds: uptime.Seconds(), Consoles: make([]Console, 0, len(consoles))}
	for _, s := range consoles {
		c := Console{
			Name: s.Name, Upstream: s.Upstream, UpstreamUp: s.UpstreamUp,
			UpstreamConnects: s.UpstreamConnects, UpstreamBytes: s.UpstreamBytes,
			Listen: s.Listen, ListenRO: s.ListenRO, ConsoleLog: s.ConsoleLog,
			LogBytesNotLogged: s.LogNotLogged,
			Clients:           make([]Client, 0, len(s.Clients)),
		}
		for _, cl := range s.Clients {
			c.Clients = append(c.Clients, Client{
				ID: cl.ID, Socket: cl.Socket, PID: cl.PID, UID: cl.UID, GID: cl.GID, ReadOnly: cl.ReadOnly,
				ConnectedSeconds: now.Sub(cl.Connected).Seconds(),
				BytesOut:         cl.BytesOut, BytesIn: cl.BytesIn, InputDiscarded: cl.InputDiscarded, Dropped: cl.Dropped,
			})
		}
		d.Consoles = append(d.Consoles, c)
	}
	return d
}

// Serve answers every connection on ln with document() until ln is
// closed; it returns nil then, after the last answer. A peer that access
// refuses is closed without an answer. A failing accept (out of
// descriptors) is retried, so that the status socket never ends the
// process. Serve takes ownership of ln.
func Serve(ln net.Listener, access *unixsock.Access, document func() Document, log hclog.Logger) error {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	denied := warnlimit.New(log, "status refused: access denied")
	defer denied.Stop()
	failing := warnlimit.New(log, "status socket: accept failed; retrying")
	defer failing.Stop()
	var answering sync.WaitGroup
	defer answering.Wait()
	delay := minRetry
	for {
		conn, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			failing.Warn("error", err, "delay", delay)
			time.Sleep(delay)
			delay = min(2*delay, maxRetry)
			continue
		}
		delay = minRetry
		if cred := unixsock.PeerCred(conn); !access.Allows(cred) {
			denied.Warn("pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid)
			conn.Close()
			continue
		}
		answering.Go(func() {
			defer conn.Close()
			b, err := json.Marshal(document())
			if err != nil {
				log.Error("status document", "error", err)
				return
			}
			conn.SetWriteDeadline(time.Now().Add(writeTimeout))
			conn.Write(append(b, '\n'))
		})
	}
}
