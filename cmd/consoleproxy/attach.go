package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/consoleproxy/consoleproxy/attach"
	"github.com/consoleproxy/consoleproxy/unixsock"
)

const attachUsageText = `Usage: consoleproxy attach [flags] SOCKET
       consoleproxy attach [flags] --status PATH NAME

Attach to a console that consoleproxy serves. attach is a plain client of a
client socket, as socat and nc are, that takes care of the terminal.

On a terminal, attach puts it in raw mode, so every key (Ctrl-C, Ctrl-D,
Ctrl-Z, the arrows) goes to the VM, and restores it however attach ends.
Type Ctrl-] (^]) to detach. Without a terminal (a pipe, a file), bytes pass
untouched and there is no escape: at the end of the input attach half-closes
the connection, keeps printing the output until --linger passes with none,
and exits.

Every client first receives the replay (the recent history), then live
output; --until matches in both.

Flags:
  --read-only      never read standard input and send nothing (for a
                   --listen-ro socket, or to watch safely); Ctrl-C leaves
  --escape CHAR    the key that detaches: ^X notation (^] ^O ^X ^?), one
                   ASCII character, or none (default ^])
  --until REGEX    print the output up to the end of the first match of
                   REGEX (Go regexp syntax), then exit 0; a match may span
                   reads, up to 64 KiB. The end of input does not end the wait.
  --timeout D      give up after D (500ms, 10s, 2m) and exit 1: with --until,
                   when nothing matched in time; without, it bounds the session
  --linger D       after the end of input, leave once D passes with no output
                   (default 1s)
  --status PATH    the daemon's status socket: attach to console NAME listed
                   there (its --listen socket; --listen-ro with --read-only)

Examples:
  consoleproxy attach /run/vm1/console.sock
      a shell in the VM; Ctrl-] detaches
  consoleproxy attach --read-only /run/vm1/console-ro.sock
      watch the console, the boot history first; Ctrl-C leaves
  consoleproxy attach --read-only --until 'login:' --timeout 2m \
      /run/vm1/console.sock
      wait for the VM to boot (exit 0), or fail after 2 minutes (exit 1)
  printf 'uname -a\n' | consoleproxy attach /run/vm1/console.sock
      run one command: print its answer, leave 1 s after the last output
  printf 'uname -a; echo END$((6*7))\n' |
      consoleproxy attach --until END42 --timeout 10s /run/vm1/console.sock
      the same, leaving once the answer is complete: the shell's echo of the
      command line shows END$((6*7)), so only the answer matches
  consoleproxy attach --status /run/consoleproxy/status.sock vm1
      the console named vm1 of a daemon with --status

Exit status: 0 detached, matched, or the input ended; 1 the connection ended
otherwise (a line says why: the proxy's refusal, "connection closed"), a
timeout, a signal, or another runtime failure; 2 usage error.
`

// attachArgs is the parsed and validated attach command line.
type attachArgs struct {
	opts attach.Options
	help bool
}

// runAttach runs the attach subcommand and returns its exit status.
// SIGINT, SIGTERM and SIGHUP end the session through its context, and
// SIGPIPE is ignored so a broken standard output is a write error, so the
// terminal is restored before the process exits.
func runAttach(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	a, err := parseAttachArgs(args)
	if err != nil {
		fmt.Fprintf(stderr, "consoleproxy attach: %v (see consoleproxy attach --help)\n", err)
		return 2
	}
	if a.help {
		fmt.Fprint(stdout, attachUsageText)
		return 0
	}
	a.opts.Stdin, a.opts.Stdout, a.opts.Stderr = stdin, stdout, stderr

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	// Output that cannot be written (attach | head, once head has left)
	// must end the session through Run, which restores the terminal, not
	// kill the process with the terminal still raw.
	signal.Ignore(syscall.SIGPIPE)
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	// Turns the first signal into the session's end; it ends with the
	// session, which closes sessionDone.
	var wg sync.WaitGroup
	sessionDone := make(chan struct{})
	wg.Go(func() {
		select {
		case sig := <-sigs:
			cancel(stopSignal{sig})
		case <-sessionDone:
		}
	})
	err = attach.Run(ctx, a.opts)
	close(sessionDone)
	wg.Wait()
	if err != nil {
		fmt.Fprintf(stderr, "consoleproxy attach: %v\n", err)
		return 1
	}
	return 0
}

// parseAttachArgs parses and validates the attach command line. Every
// error it returns is a usage error. Flags may come before or after the
// SOCKET, as people type them; after "--" everything is an argument.
func parseAttachArgs(args []string) (*attachArgs, error) {
	fs := flag.NewFlagSet("consoleproxy attach", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var (
		a       = &attachArgs{}
		escape  = fs.String("escape", "^]", "")
		until   = fs.String("until", "", "")
		timeout = fs.String("timeout", "", "")
		linger  = fs.String("linger", attach.DefaultLinger.String(), "")
	)
	fs.BoolVar(&a.opts.ReadOnly, "read-only", false, "")
	fs.StringVar(&a.opts.Status, "status", "", "")
	fs.BoolVar(&a.help, "help", false, "")
	fs.BoolVar(&a.help, "h", false, "")
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, usagef("%s", strings.TrimPrefix(err.Error(), "flag: "))
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			positional = append(positional, rest...)
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	if a.help {
		return a, nil
	}

	what := "SOCKET"
	if a.opts.Status != "" {
		what = "NAME"
		if err := unixsock.CheckSocketPath(a.opts.Status); err != nil {
			return nil, usagef("--status: %v", err)
		}
	}
	switch len(positional) {
	case 0:
		return nil, usagef("missing %s", what)
	case 1:
	default:
		return nil, usagef("unexpected argument %q (attach takes one %s)", positional[1], what)
	}
	if a.opts.Status != "" {
		a.opts.Console = positional[0]
	} else {
		a.opts.Socket = positional[0]
		if err := unixsock.CheckSocketPath(a.opts.Socket); err != nil {
			return nil, usagef("%v", err)
		}
	}

	var err error
	if a.opts.Escape, a.opts.NoEscape, err = attach.ParseEscape(*escape); err != nil {
		return nil, usagef("--escape: %v", err)
	}
	if *until != "" {
		if a.opts.Until, err = regexp.Compile(*until); err != nil {
			return nil, usagef("--until: %v", err)
		}
	}
	if *timeout != "" {
		if a.opts.Timeout, err = parsePositiveDuration(*timeout); err != nil {
			return nil, usagef("--timeout: %v", err)
		}
	}
	if a.opts.Linger, err = parsePositiveDuration(*linger); err != nil {
		return nil, usagef("--linger: %v", err)
	}
	return a, nil
}

// parsePositiveDuration parses a Go duration (300ms, 10s, 2m) above zero.
func parsePositiveDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%q is not a duration above zero such as 500ms, 10s or 2m", s)
	}
	return d, nil
}
