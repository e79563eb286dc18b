package proxy

import (
	"cmp"
	"slices"
	"time"
)

// ClientStats describes one connected client.
type ClientStats struct {
	ID             uint64
	Socket         string
	PID            int32
	UID, GID       uint32
	ReadOnly       bool
	Connected      time.Time
	BytesOut       uint64 // output sent to the client
	BytesIn        uint64 // input sent to the upstream
	InputDiscarded uint64 // input not sent: read-only, or upstream down
	Dropped        uint64 // output skipped because the client fell behind
}

// Stats is a snapshot of the proxy's activity. The totals include clients
// that have gone.
type Stats struct {
	Clients          []ClientStats // connected now, oldest first
	ClientsServed    uint64        // clients ever admitted
	UpstreamBytes    uint64        // output read from the upstream
	UpstreamConnects uint64
	UpstreamUp       bool
	BytesOut         uint64
	BytesIn          uint64
	InputDiscarded   uint64
	Dropped          uint64
	// LogNotLogged counts the console bytes that RunLog's writer lost (it
	// fell a ring behind, or its writes failed meanwhile).
	LogNotLogged uint64
}

// Stats returns a snapshot of the proxy's counters. It is safe to call at
// any time.
func (p *Proxy) Stats() Stats {
	p.inputMu.Lock()
	up := p.upstream != nil
	p.inputMu.Unlock()

	p.mu.Lock()
	s := p.totals
	s.ClientsServed = p.nextID
	s.UpstreamBytes = p.upstreamBytes
	s.UpstreamConnects = p.upstreamConnects
	s.UpstreamUp = up
	for c := range p.clients {
		cs := c.statsLocked()
		s.Clients = append(s.Clients, cs)
		s.BytesOut += cs.BytesOut
		s.BytesIn += cs.BytesIn
		s.InputDiscarded += cs.InputDiscarded
		s.Dropped += cs.Dropped
	}
	p.mu.Unlock()
	slices.SortFunc(s.Clients, func(a, b ClientStats) int { return cmp.Compare(a.ID, b.ID) })
	s.LogNotLogged = p.logNotLogged.Load()
	return s
}

// statsLocked reads the client's counters; p.mu must be held.
func (c *client) statsLocked() ClientStats {
	return ClientStats{
		ID:             c.id,
		Socket:         c.socket,
		PID:            c.cred.Pid,
		UID:            c.cred.Uid,
		GID:            c.cred.Gid,
		ReadOnly:       c.readOnly,
		Connected:      c.connected,
		BytesOut:       c.bytesOut.Load(),
		BytesIn:        c.bytesIn.Load(),
		InputDiscarded: c.discarded.Load(),
		Dropped:        c.r.dropped,
	}
}
