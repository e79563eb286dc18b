// Package attach is the console client behind `consoleproxy attach`: it
// connects to one of the proxy's client sockets and copies bytes between
// that socket and the standard streams, as socat or nc would, with what a
// person or a script needs on top: raw mode and an escape key on a
// terminal; a half-close and a linger at the end of piped input; waiting
// for a pattern with a deadline; finding a console by name in the status
// socket's document.
//
// It is not a protocol: the proxy cannot tell it from socat, and it does
// not import the proxy. It assumes only what the contract promises: a
// stream of bytes in which the proxy's notices stand on lines of their own,
// and a refused client receives one notice and is closed.
//
// Run does not handle signals, which are process-wide: its caller cancels
// the context (main does on SIGTERM, SIGHUP and SIGINT), and Run restores
// the terminal on that way out as on every other.
package attach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/term"
)

// The ways a session ends other than a detach, a match or the end of
// input, for callers that map them to exit codes. Errors from Run wrap
// them with the details; compare with errors.Is.
var (
	// ErrClosed is the connection ended by the proxy before the session
	// was over: a refusal, the daemon stopping, the console retired. When
	// the last thing received was a notice, its text is the error's detail.
	ErrClosed = errors.New("connection closed")
	// ErrTimeout is Options.Timeout passed first.
	ErrTimeout = errors.New("timed out")
	// ErrUnknownConsole is a name the status document does not list.
	ErrUnknownConsole = errors.New("no console")
	// ErrNoReadOnlySocket is a read-only session asked of a console whose
	// daemon has no --listen-ro socket.
	ErrNoReadOnlySocket = errors.New("no read-only socket")
)

// DefaultLinger is how long a session whose input ended keeps printing
// output after the last of it: long enough for a command's answer to
// arrive, short enough for a script not to notice.
const DefaultLinger = time.Second

// Options configures one session. The zero value of each field means its
// documented default.
type Options struct {
	// Socket is the client socket to connect to, unless Status is set.
	Socket string
	// Status, when set, is the daemon's status socket, and the session
	// attaches to console Console found in its document (its listen
	// socket, or listen_ro with ReadOnly); Socket is then ignored.
	Status  string
	Console string

	// ReadOnly never reads Stdin and sends nothing: the write side is
	// shut down at once. Use it with a --listen-ro socket, or to watch a
	// read-write one safely.
	ReadOnly bool
	// Escape is the byte that detaches an interactive session; 0 means
	// DefaultEscape. NoEscape turns the escape off, so every byte typed
	// reaches the console. Neither applies when Stdin is not a terminal:
	// piped bytes pass untouched.
	Escape   byte
	NoEscape bool

	// Until ends the session, successfully, once the output matches it.
	// Output is printed up to the end of the first match and no further.
	// The match is searched in the last 64 KiB of output plus each new
	// read, so it is found whatever the reads' sizes; ^ and \A therefore
	// also match where that window starts. While Until is set, the end of
	// input does not end the session: only a match, Timeout, or the
	// connection's end do.
	Until *regexp.Regexp
	// Timeout, when positive, bounds the whole session from the moment it
	// is connected: when it passes first, Run returns ErrTimeout (with
	// Until: nothing matched in time).
	Timeout time.Duration
	// Linger is how long the session keeps printing output, after Stdin
	// ended, before it ends for want of more; each read of output starts
	// it anew. 0 means DefaultLinger.
	Linger time.Duration

	// Stdin is the input. When it is an *os.File that is a terminal (and
	// ReadOnly is not set) the session is interactive: the terminal is put
	// in raw mode and restored before Run returns, and the escape
	// detaches. Run reads an *os.File through a descriptor of its own
	// (reopened through /proc/self/fd), so that a pending read ends when
	// Run returns without changing the flags of a descriptor it shares
	// with the shell; when that fails, the pending read is left to end
	// with the process. Any other reader must return from Read on its own
	// (Run waits for it). nil means no input, as /dev/null.
	Stdin io.Reader
	// Stdout receives the console's output; nil discards it.
	Stdout io.Writer
	// Stderr receives the one header line an interactive session prints;
	// nil discards it.
	Stderr io.Writer
}

// sendFailedGrace bounds how long a session whose input could not be sent
// waits for the output side to report why the connection ended (the
// refusal notice, the close), which it does at once when the proxy closed.
const sendFailedGrace = time.Second

// Run connects and runs one session until it ends. It returns nil for a
// detach (the escape typed), a match of Until, or the end of Stdin
// followed by Linger of quiet (or by the proxy closing). It returns an
// error wrapping ErrClosed when the connection ends otherwise, ErrTimeout
// when Timeout passes, the cause of ctx when ctx is done, or what failed
// (connecting, reading Stdin, writing Stdout). It blocks until the session
// ends and its goroutines have stopped; the terminal, if it made it raw,
// is restored by then whatever the way out.
func Run(ctx context.Context, o Options) error {
	o.resolveDefaults()
	socket := o.Socket
	if o.Status != "" {
		var err error
		if socket, err = LookupConsole(ctx, o.Status, o.Console, o.ReadOnly); err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return err
		}
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		// The error names the socket and the cause.
		return err
	}
	s := &session{o: o, socket: socket, conn: c.(*net.UnixConn)}
	return s.run(ctx)
}

func (o *Options) resolveDefaults() {
	if o.Escape == 0 {
		o.Escape = DefaultEscape
	}
	if o.Linger <= 0 {
		o.Linger = DefaultLinger
	}
	if o.Stdout == nil {
		o.Stdout = io.Discard
	}
	if o.Stderr == nil {
		o.Stderr = io.Discard
	}
}

// session is one connection and the two copies over it. The output copy
// runs on a goroutine of its own, so does the input copy (unless
// read-only); run owns both, ends them and waits for them.
type session struct {
	o      Options
	socket string
	conn   *net.UnixConn

	// Touched only by the output goroutine until run has waited for it.
	match  *matcher
	recent []byte // the last bytes of output, to tell a closing notice
	wrote  bool   // any output written
}

// recentSize is the output kept to find the last line when the
// connection closes; a notice is far shorter.
const recentSize = 512

// outcome is how one of the copies ended.
type outcome int

const (
	outputMatched outcome = iota
	outputClosed          // the proxy closed the connection
	outputFailed          // err says why
	inputDetached
	inputEnded      // end of Stdin
	inputSendFailed // err says why; the output side knows more
	inputFailed
	copyInterrupted // run stopped the copy
)

type copyResult struct {
	outcome outcome
	err     error
}

func (s *session) run(ctx context.Context) (err error) {
	stdinFile, _ := s.o.Stdin.(*os.File)
	fd, isFile := fdOf(stdinFile)
	onTerminal := isFile && term.IsTerminal(fd)
	interactive := onTerminal && !s.o.ReadOnly
	if s.o.Until != nil {
		s.match = &matcher{re: s.o.Until}
	}

	var restore func()
	if interactive {
		state, err := term.MakeRaw(fd)
		if err != nil {
			s.conn.Close()
			return fmt.Errorf("raw mode for the terminal: %w", err)
		}
		restore = func() { term.Restore(fd, state) }
		leave := "type " + EscapeName(s.o.Escape) + " to detach"
		if s.o.NoEscape {
			leave = "no escape: close the terminal or send SIGTERM to leave"
		}
		// Raw mode is in effect: a line ends with CR LF.
		fmt.Fprintf(s.o.Stderr, "consoleproxy attach: attached to %s (%s)\r\n", s.socket, leave)
	} else if onTerminal {
		fmt.Fprintf(s.o.Stderr, "consoleproxy attach: watching %s read-only (Ctrl-C to leave)\n", s.socket)
	}

	var (
		wg       sync.WaitGroup
		output   = make(chan copyResult, 1)
		input    chan copyResult // nil (never ready) when read-only or once ended
		activity = make(chan struct{}, 1)
		stopIn   = func() {}
	)
	wg.Go(func() { output <- s.copyOutput(activity) })
	if s.o.ReadOnly {
		if err := s.conn.CloseWrite(); err != nil {
			s.conn.Close()
			wg.Wait()
			return fmt.Errorf("shut down sending: %w", err)
		}
	} else {
		in, interrupt, waitable := openInput(s.o.Stdin, stdinFile)
		stopIn = interrupt
		input = make(chan copyResult, 1)
		escape := -1
		if interactive && !s.o.NoEscape {
			escape = int(s.o.Escape)
		}
		if waitable {
			wg.Go(func() { input <- s.copyInput(in, escape) })
		} else {
			// A read that cannot be interrupted: left to end with the
			// process (see Options.Stdin).
			go func() { input <- s.copyInput(in, escape) }()
		}
	}
	// Whatever the way out: stop both copies and wait for them, end the
	// output on a line of its own, then give the terminal back.
	defer func() {
		s.conn.Close()
		stopIn()
		wg.Wait()
		if interactive {
			if s.wrote && s.recent[len(s.recent)-1] != '\n' {
				s.o.Stdout.Write([]byte("\r\n"))
			}
			restore()
		}
	}()

	// Each timer's channel stays nil (never ready) until the timer runs.
	var timeout, linger, sendFailed <-chan time.Time
	var timers []*time.Timer
	defer func() {
		for _, t := range timers {
			t.Stop()
		}
	}()
	startTimer := func(d time.Duration) *time.Timer {
		t := time.NewTimer(d)
		timers = append(timers, t)
		return t
	}
	if s.o.Timeout > 0 {
		timeout = startTimer(s.o.Timeout).C
	}
	var lingerTimer *time.Timer
	var sendErr error
	inputDone := false
	for {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-timeout:
			if s.o.Until != nil {
				return fmt.Errorf("%w: no match for %q within %v", ErrTimeout, s.o.Until, s.o.Timeout)
			}
			return fmt.Errorf("%w after %v", ErrTimeout, s.o.Timeout)
		case <-linger:
			return nil
		case <-sendFailed:
			return sendErr
		case <-activity:
			if lingerTimer != nil {
				lingerTimer.Reset(s.o.Linger)
			}
		case r := <-output:
			switch r.outcome {
			case outputMatched:
				return nil
			case outputClosed:
				return s.closedErr(inputDone)
			}
			return r.err
		case r := <-input:
			input = nil
			switch r.outcome {
			case inputDetached:
				return nil
			case inputEnded:
				inputDone = true
				if err := s.conn.CloseWrite(); err != nil {
					// The connection is gone: the output side says why.
					continue
				}
				if s.o.Until == nil {
					lingerTimer = startTimer(s.o.Linger)
					linger = lingerTimer.C
				}
			case inputSendFailed:
				sendErr = r.err
				sendFailed = startTimer(sendFailedGrace).C
			default:
				return r.err
			}
		}
	}
}

// closedErr is the result of the proxy closing the connection: the last
// line received, when it is a notice, says why (a refusal, the console
// retired). Without one, a session whose input had ended (and that does
// not wait for Until) is over anyway: the linger was cut short.
func (s *session) closedErr(inputDone bool) error {
	if text, ok := lastNotice(s.recent); ok {
		return fmt.Errorf("%w: %s", ErrClosed, text)
	}
	if inputDone && s.o.Until == nil {
		return nil
	}
	return ErrClosed
}

// noticePrefix starts every line the proxy adds to the stream.
const noticePrefix = "[consoleproxy] "

// lastNotice returns the text of the notice that out ends with, if it does.
func lastNotice(out []byte) (string, bool) {
	line, ok := bytes.CutSuffix(out, []byte("\r\n"))
	if !ok {
		return "", false
	}
	if i := bytes.LastIndexByte(line, '\n'); i >= 0 {
		line = line[i+1:]
	}
	text, ok := bytes.CutPrefix(line, []byte(noticePrefix))
	if !ok {
		return "", false
	}
	return string(text), true
}

// copyOutput copies the connection to Stdout until the connection ends,
// Until matches or a write fails, and signals activity after each read.
func (s *session) copyOutput(activity chan<- struct{}) copyResult {
	buf := make([]byte, 32<<10)
	for {
		n, err := s.conn.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			matched := false
			if s.match != nil {
				if end := s.match.feed(chunk); end >= 0 {
					chunk, matched = chunk[:end], true
				}
			}
			s.remember(chunk)
			if _, err := s.o.Stdout.Write(chunk); err != nil {
				return copyResult{outputFailed, fmt.Errorf("standard output: %w", err)}
			}
			if matched {
				return copyResult{outcome: outputMatched}
			}
			select {
			case activity <- struct{}{}:
			default: // one pending signal is as good as many
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET):
			return copyResult{outcome: outputClosed}
		case errors.Is(err, net.ErrClosed):
			return copyResult{outcome: copyInterrupted}
		default:
			return copyResult{outputFailed, fmt.Errorf("receive from %s: %w", s.socket, err)}
		}
	}
}

// remember keeps the last recentSize bytes of output.
func (s *session) remember(chunk []byte) {
	if len(chunk) == 0 {
		return
	}
	s.wrote = true
	s.recent = append(s.recent, chunk...)
	if drop := len(s.recent) - recentSize; drop > 0 {
		s.recent = append(s.recent[:0], s.recent[drop:]...)
	}
}

// copyInput copies in to the connection until in ends or fails, a send
// fails, or the escape byte (when escape >= 0) is read; the bytes before
// the escape are sent first.
func (s *session) copyInput(in io.Reader, escape int) copyResult {
	// The proxy writes each read whole, up to 4 KiB: sending no more at a
	// time keeps a paste in the order and the pieces it was read in.
	buf := make([]byte, 4<<10)
	for {
		n, err := in.Read(buf)
		if n > 0 {
			chunk, detach := buf[:n], false
			if escape >= 0 {
				if i := bytes.IndexByte(chunk, byte(escape)); i >= 0 {
					chunk, detach = chunk[:i], true
				}
			}
			if len(chunk) > 0 {
				if _, err := s.conn.Write(chunk); err != nil {
					if errors.Is(err, net.ErrClosed) {
						return copyResult{outcome: copyInterrupted}
					}
					return copyResult{inputSendFailed, fmt.Errorf("send to %s: %w", s.socket, err)}
				}
			}
			if detach {
				return copyResult{outcome: inputDetached}
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			return copyResult{outcome: inputEnded}
		case errors.Is(err, os.ErrClosed):
			return copyResult{outcome: copyInterrupted}
		default:
			return copyResult{inputFailed, fmt.Errorf("standard input: %w", err)}
		}
	}
}

// openInput returns the reader the input copy reads, a function that ends
// a pending read, and whether run may wait for the copy to end. An
// *os.File is reopened through /proc/self/fd, which gives a file
// description of its own: Go's poller can then make it non-blocking, so
// closing it ends a pending read, without touching the flags of the
// description this process shares with its shell (a terminal's, a
// pipe's). O_NONBLOCK on open, too, so that opening a pipe whose writer
// has gone does not wait for a writer.
func openInput(stdin io.Reader, f *os.File) (in io.Reader, interrupt func(), waitable bool) {
	if stdin == nil {
		return eofReader{}, func() {}, true
	}
	if f == nil {
		return stdin, func() {}, true
	}
	fd, ok := fdOf(f)
	if ok {
		own, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(fd), os.O_RDONLY|syscall.O_NOCTTY|syscall.O_NONBLOCK, 0)
		if err == nil {
			return own, func() { own.Close() }, true
		}
	}
	return f, func() {}, false
}

// eofReader is a Stdin of nil: input that has already ended.
type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// fdOf returns f's descriptor without the side effect of f.Fd, which puts
// a pollable file in blocking mode.
func fdOf(f *os.File) (int, bool) {
	if f == nil {
		return -1, false
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, false
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, false
	}
	return fd, fd >= 0
}
