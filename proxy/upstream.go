package proxy

import (
	"context"
	"io"
	"maps"
	"slices"

	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/upstream"
)

// RunUpstream keeps the upstream connected and drains it into the ring
// until ctx is done, then returns nil; see upstream.Run, which it runs with
// the proxy as the sink. Call it once.
func (p *Proxy) RunUpstream(ctx context.Context) error {
	return upstream.Run(ctx, p.cfg.Upstream, upstreamSink{p}, upstream.Options{
		ExitWithUpstream: p.cfg.ExitWithUpstream,
		Watcher:          p.cfg.Watcher,
		IsOwn:            p.isOwnSocket,
		Logger:           p.upLog,
	})
}

// isOwnSocket reports whether path names one of the sockets the proxy
// serves.
func (p *Proxy) isOwnSocket(path string) bool {
	for _, ln := range p.cfg.OwnSockets {
		if ln.Names(path) {
			return true
		}
	}
	// The stat is I/O: not under mu, which guards the ring.
	p.mu.Lock()
	lns := slices.Collect(maps.Keys(p.listeners))
	p.mu.Unlock()
	for _, ln := range lns {
		if sl, ok := ln.(*unixsock.SocketListener); ok && sl.Names(path) {
			return true
		}
	}
	return false
}

// upstreamSink is the proxy as upstream.Run sees it. Its methods are on a
// type of their own so that they are not part of the Proxy's API.
type upstreamSink struct{ p *Proxy }

// Connected makes conn the destination of input and starts its writer.
func (s upstreamSink) Connected(conn io.Writer) {
	p := s.p
	p.mu.Lock()
	p.upstreamConnects++
	p.mu.Unlock()
	p.inputMu.Lock()
	p.upstream = conn
	discarded := p.discardedDown
	p.discardedDown = 0
	p.inputStop = make(chan struct{})
	stop := p.inputStop
	p.inputMu.Unlock()
	p.inputWriter.Go(func() { p.writeInputTo(conn, stop) })
	if discarded > 0 {
		p.upLog.Info("input discarded while the upstream was down", "bytes", discarded)
	}
	p.appendNotice(noticeConnected)
}

// Output adds upstream output to the ring; it never waits for a reader.
func (s upstreamSink) Output(b []byte) { s.p.appendOutput(b) }

// Disconnected stops the input writer, discards the input still queued
// and, unless the proxy is stopping, tells every reader.
func (s upstreamSink) Disconnected(reason string, stopping bool) {
	p := s.p
	p.inputMu.Lock()
	p.upstream = nil
	close(p.inputStop)
	p.inputMu.Unlock()
	p.inputWriter.Wait()
	p.dropQueuedInput()
	if !stopping {
		p.appendNotice(noticeLost(reason))
	}
}

// Upstream kinds, for a program that uses the proxy as a library without
// importing package upstream.
type (
	// UnixUpstream is upstream.UnixUpstream.
	UnixUpstream = upstream.UnixUpstream
	// TCPUpstream is upstream.TCPUpstream.
	TCPUpstream = upstream.TCPUpstream
	// ListenUpstream is upstream.ListenUpstream.
	ListenUpstream = upstream.ListenUpstream
	// PTYUpstream is upstream.PTYUpstream.
	PTYUpstream = upstream.PTYUpstream
	// Upstream is upstream.Upstream.
	Upstream = upstream.Upstream
)
