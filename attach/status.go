package attach

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// statusTimeout bounds reading the status document: the daemon writes it
// at once and closes, so a socket that stays silent is not a status socket.
const statusTimeout = 10 * time.Second

// maxStatusSize bounds the status document read: thousands of consoles,
// each with dozens of clients, fit many times over.
const maxStatusSize = 64 << 20

// statusDocument is the part of the status socket's document that attach
// reads; the contract's other fields are ignored.
type statusDocument struct {
	Consoles []struct {
		Name     string `json:"name"`
		Listen   string `json:"listen"`
		ListenRO string `json:"listen_ro"`
	} `json:"consoles"`
}

// LookupConsole reads the status document from the daemon's status socket
// at statusPath and returns the client socket of console name: its listen
// socket, or its listen_ro socket when readOnly is set. It blocks until the
// document is read, ctx is done, or 10 s pass. An unknown name is an
// ErrUnknownConsole that lists the names there are; a console without a
// read-only socket is ErrNoReadOnlySocket.
func LookupConsole(ctx context.Context, statusPath, name string, readOnly bool) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", statusPath)
	if err != nil {
		return "", fmt.Errorf("status socket: %w", err)
	}
	defer conn.Close()
	// The deadline, not a goroutine, ends a read of a silent socket.
	deadline, _ := ctx.Deadline()
	conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	b, err := io.ReadAll(io.LimitReader(conn, maxStatusSize))
	if err != nil {
		return "", fmt.Errorf("status socket %s: read: %w", statusPath, err)
	}
	var doc statusDocument
	if err := json.Unmarshal(b, &doc); err != nil {
		return "", fmt.Errorf("status socket %s: not a status document: %w", statusPath, err)
	}
	names := make([]string, 0, len(doc.Consoles))
	for _, c := range doc.Consoles {
		if c.Name != name {
			names = append(names, fmt.Sprintf("%q", c.Name))
			continue
		}
		if !readOnly {
			return c.Listen, nil
		}
		if c.ListenRO == "" {
			return "", fmt.Errorf("%w: console %q (the daemon runs without --listen-ro)", ErrNoReadOnlySocket, name)
		}
		return c.ListenRO, nil
	}
	there := "there are none"
	if len(names) > 0 {
		there = "there are " + strings.Join(names, ", ")
	}
	return "", fmt.Errorf("%w %q in %s; %s", ErrUnknownConsole, name, statusPath, there)
}
