package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/consoleproxy/consoleproxy/host"
	"github.com/consoleproxy/consoleproxy/logsink"
	"github.com/consoleproxy/consoleproxy/proxy"
	"github.com/consoleproxy/consoleproxy/unixsock"
	"github.com/consoleproxy/consoleproxy/upstream"
	"github.com/hashicorp/go-hclog"
)

// errUsage marks errors in the command line, which exit 2.
var errUsage = errors.New("usage")

// usageError is a command-line mistake; its text is the one line printed.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }
func (e *usageError) Is(target error) bool {
	return target == errUsage
}

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// options is the parsed and validated command line.
type options struct {
	upstream         proxy.Upstream // nil with a pattern
	pattern          *host.Pattern  // host mode: the --upstream path's pattern
	upstreamKind     string         // with a pattern: unix or pty
	maxConsoles      int
	retireAfter      time.Duration
	status           string
	listen           string
	listenRO         string
	bufferSize       int
	replay           proxy.ReplaySize
	slowClient       proxy.SlowClientPolicy
	maxClients       int
	socket           unixsock.SocketOptions // the read-write socket and a listen: upstream
	roSocket         unixsock.SocketOptions // the read-only socket
	notices          bool
	exitWithUpstream bool
	allowUIDs        []string // names or ids, resolved at start
	allowGIDs        []string
	roAllowUIDs      []string // the read-only socket's; default: the above
	roAllowGIDs      []string
	consoleLog       string
	logOptions       logsink.Options
	logLevel         hclog.Level
	logJSON          bool
	version          bool
	help             bool
}

const usageText = `Usage: consoleproxy --upstream SPEC --listen PATH [flags]
       consoleproxy attach [flags] SOCKET|NAME
                     a console client (see consoleproxy attach --help)

consoleproxy owns a virtual machine's serial console socket, which the VMM
serves to one client at a time, and re-exports it to many clients at once.
Every client first receives the recent history (the replay), then live
output; keystrokes from read-write clients go to the VM. The VM never waits
for a client: one that falls a whole buffer behind is told how many bytes
it missed. With a '*' in --upstream, one process serves every VM on a host.

Upstream (where the console comes from):
  --upstream SPEC          one of:
    unix:PATH              connect to the VMM's socket (Cloud Hypervisor
                           --serial socket=PATH, QEMU -chardev
                           socket,server=on)
    pty:PATH               open a PTY or a symlink to one, in raw mode
                           (QEMU -serial pty, Cloud Hypervisor --serial pty)
    listen:PATH            listen for the VMM to connect, one at a time
                           (QEMU -chardev socket,server=off)
    tcp:HOST:PORT          connect over TCP
                           Every kind reconnects forever. A bare PATH is
                           accepted when it exists: a socket means unix:, a
                           character device pty:.
  --exit-with-upstream     exit 0 when the upstream closes instead of
                           reconnecting

Client sockets:
  --listen PATH            read-write client socket (required)
  --listen-ro PATH         read-only client socket: output only, input
                           discarded
  --socket-mode MODE       octal mode of the client sockets, the status
                           socket and a listen: socket (default 0600)
  --socket-group GROUP     group name or gid of those sockets
  --max-clients N          clients across both sockets (default 64)
  --allow-uid LIST         comma list of users (names or uids) allowed to
                           connect
  --allow-gid LIST         comma list of groups (names or gids) allowed to
                           connect; with either, a client whose uid or
                           primary gid (from the kernel, SO_PEERCRED)
                           matches neither is refused; root always may.
                           Without both, the socket mode alone decides.
                           They also apply to the status socket and to a
                           listen: upstream, where the proxy's own user may
                           connect too: whoever connects there is the VMM.
  --ro-socket-mode MODE, --ro-socket-group GROUP,
  --ro-allow-uid LIST, --ro-allow-gid LIST
                           the same for the --listen-ro socket alone; each
                           defaults to its read-write counterpart. Viewers'
                           rules never widen the read-write socket's: for
                           example operators get --socket-mode 0600,
                           viewers --ro-socket-mode 0660 --ro-socket-group
                           viewers.

History and slow clients:
  --buffer-size SIZE       history kept in memory, 4KiB to 1GiB (default
                           1MiB)
  --replay all|none|SIZE   what a new client receives first (default all)
  --slow-client skip|disconnect
                           a client a whole buffer behind skips ahead with
                           a notice of the bytes it missed, or is closed
                           (default skip)
  --notices                write [consoleproxy] notices into the stream
                           (default true; --notices=false turns them off)

Console log:
  --console-log PATH       append the raw console output to PATH; on start,
                           the ring is seeded from it, so clients see the
                           history from before a restart. SIGHUP reopens
                           PATH (for logrotate).
  --console-log-max-size SIZE
                           rotate when PATH would pass SIZE (default 16MiB;
                           0 never)
  --console-log-max-files N
                           rotated files kept, PATH.1 (newest) to PATH.N
                           (default 5)
  --console-log-timestamps prefix each log line (never the live stream)
                           with an RFC 3339 UTC time with milliseconds

Every VM on a host (host mode):
  A unix: or pty: --upstream whose path holds one '*' is a pattern, such as
  unix:/run/vms/*/serial.sock. Every path that matches it, now or later, is
  a console; the '*' matches within one path element. In --listen,
  --listen-ro and --console-log, {name} is what the '*' matched and {dir}
  the directory of the match; --listen must hold one of them, and so must
  the other two when given. Every other flag applies to each console on its
  own (--max-clients is per console). A console whose upstream is back
  within --retire-after is a VM restart: its clients stay. One missing for
  longer, or whose client socket's directory is removed, retires: its
  clients get a notice and are closed, its sockets are removed. A console
  that cannot start is logged and tried again when its directory changes.
  --max-consoles N         consoles served at once, first come first
                           served; a match beyond waits (default 1024)
  --retire-after DURATION  how long a console's upstream may be missing
                           before it retires, such as 30s or 2m (default
                           30s)

Status:
  --status PATH            a socket that answers each connection with one
                           JSON document (every console, its upstream and
                           its clients) and a newline, then closes it:
                           nc -U PATH | jq. In either mode.

Diagnostics:
  --log-level LEVEL        trace, debug, info, warn, error (default info)
  --log-format text|json   (default text)
  --version                print the version and exit

SIZE is a number with an optional binary unit: B, K/KiB, M/MiB, G/GiB.
Signals: SIGHUP reopens every console log, SIGUSR1 logs one line per
console and per client, SIGTERM and SIGINT stop every console at once.

Examples:
  consoleproxy --upstream unix:/run/vm1/serial.sock \
      --listen /run/vm1/console.sock
  consoleproxy attach /run/vm1/console.sock       (Ctrl-] detaches)
  socat -,raw,echo=0 UNIX-CONNECT:/run/vm1/console.sock
  nc -U /run/vm1/console.sock

  consoleproxy --upstream 'unix:/run/vms/*/serial.sock' \
      --listen '{dir}/console.sock' \
      --console-log '/var/log/consoleproxy/{name}.log' \
      --status /run/consoleproxy/status.sock
  consoleproxy attach --status /run/consoleproxy/status.sock vm1

Exit status: 0 clean stop, 1 runtime failure, 2 usage error.
`

// parseArgs parses and validates the command line. Every error it returns
// is a usage error. It looks at the system only for a bare --upstream PATH.
func parseArgs(args []string) (*options, error) {
	fs := flag.NewFlagSet("consoleproxy", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var (
		upstream   = fs.String("upstream", "", "")
		bufferSize = fs.String("buffer-size", "1MiB", "")
		replay     = fs.String("replay", "all", "")
		slowClient = fs.String("slow-client", "skip", "")
		maxClients = fs.String("max-clients", strconv.Itoa(proxy.DefaultMaxClients), "")
		socketMode = fs.String("socket-mode", "0600", "")
		logLevel   = fs.String("log-level", "info", "")
		logFormat  = fs.String("log-format", "text", "")
		allowUID   = fs.String("allow-uid", "", "")
		allowGID   = fs.String("allow-gid", "", "")
		roMode     = fs.String("ro-socket-mode", "", "")
		roGroup    = fs.String("ro-socket-group", "", "")
		roAllowUID = fs.String("ro-allow-uid", "", "")
		roAllowGID = fs.String("ro-allow-gid", "", "")
		maxCons    = fs.String("max-consoles", strconv.Itoa(host.DefaultMaxConsoles), "")
		retire     = fs.String("retire-after", host.DefaultRetireAfter.String(), "")
		logMaxSize = fs.String("console-log-max-size", "16MiB", "")
		logFiles   = fs.String("console-log-max-files", "5", "")
		o          = &options{}
	)
	fs.StringVar(&o.consoleLog, "console-log", "", "")
	fs.BoolVar(&o.logOptions.Timestamps, "console-log-timestamps", false, "")
	fs.StringVar(&o.listen, "listen", "", "")
	fs.StringVar(&o.listenRO, "listen-ro", "", "")
	fs.StringVar(&o.status, "status", "", "")
	fs.StringVar(&o.socket.Group, "socket-group", "", "")
	fs.BoolVar(&o.notices, "notices", true, "")
	fs.BoolVar(&o.exitWithUpstream, "exit-with-upstream", false, "")
	fs.BoolVar(&o.version, "version", false, "")
	fs.BoolVar(&o.help, "help", false, "")
	fs.BoolVar(&o.help, "h", false, "")
	if err := fs.Parse(args); err != nil {
		return nil, usagef("%s", strings.TrimPrefix(err.Error(), "flag: "))
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected argument %q (all settings are flags)", fs.Arg(0))
	}
	if o.help || o.version {
		return o, nil
	}

	var err error
	if *upstream == "" {
		return nil, usagef("--upstream is required")
	}
	if err := parseUpstreamOrPattern(*upstream, o); err != nil {
		return nil, err
	}
	if o.listen == "" {
		return nil, usagef("--listen is required")
	}
	if err := checkTemplates(fs, o, *maxCons, *retire); err != nil {
		return nil, err
	}
	for _, s := range []struct{ flag, path string }{{"--listen", o.listen}, {"--listen-ro", o.listenRO}, {"--status", o.status}} {
		// A template's length is known only once it is expanded: a
		// console whose socket path is too long cannot start, and says so.
		if s.path == "" || (o.pattern != nil && host.HasPlaceholder(s.path)) {
			continue
		}
		if err := unixsock.CheckSocketPath(s.path); err != nil {
			return nil, usagef("%s: %v", s.flag, err)
		}
	}
	if err := checkDistinctPaths(o); err != nil {
		return nil, err
	}
	size, err := parseSize(*bufferSize)
	if err != nil {
		return nil, usagef("--buffer-size: %v", err)
	}
	if size < proxy.MinBufferSize || size > proxy.MaxBufferSize {
		return nil, usagef("--buffer-size: %s is outside 4KiB to 1GiB", *bufferSize)
	}
	o.bufferSize = int(size)
	switch *replay {
	case "all":
		o.replay = proxy.ReplayAll
	case "none":
		o.replay = proxy.ReplayNone
	default:
		n, err := parseSize(*replay)
		if err != nil {
			return nil, usagef("--replay: want all, none or a size: %v", err)
		}
		// Clamp to the ring: a replay can never exceed what it holds.
		o.replay = proxy.ReplaySize(min(n, size))
		if n == 0 {
			o.replay = proxy.ReplayNone
		}
	}
	switch *slowClient {
	case "skip":
		o.slowClient = proxy.SlowClientSkip
	case "disconnect":
		o.slowClient = proxy.SlowClientDisconnect
	default:
		return nil, usagef("--slow-client: %q is not skip or disconnect", *slowClient)
	}
	if o.maxClients, err = strconv.Atoi(*maxClients); err != nil || o.maxClients < 1 {
		return nil, usagef("--max-clients: %q is not a whole number of at least 1", *maxClients)
	}
	if o.socket.Mode, err = parseMode(*socketMode); err != nil {
		return nil, usagef("--socket-mode: %v", err)
	}
	// Each --ro-* flag defaults to its read-write counterpart, so a command
	// line without them means what it always meant.
	o.roSocket = o.socket
	if isSet(fs, "ro-socket-mode") {
		if o.roSocket.Mode, err = parseMode(*roMode); err != nil {
			return nil, usagef("--ro-socket-mode: %v", err)
		}
	}
	if isSet(fs, "ro-socket-group") {
		if *roGroup == "" {
			return nil, usagef("--ro-socket-group: empty group")
		}
		o.roSocket.Group = *roGroup
	}
	if o.logLevel = hclog.LevelFromString(*logLevel); o.logLevel == hclog.NoLevel || o.logLevel == hclog.Off {
		return nil, usagef("--log-level: %q is not trace, debug, info, warn or error", *logLevel)
	}
	for _, a := range []struct {
		flag, list string
		ids        *[]string
	}{
		{"--allow-uid", *allowUID, &o.allowUIDs}, {"--allow-gid", *allowGID, &o.allowGIDs},
		{"--ro-allow-uid", *roAllowUID, &o.roAllowUIDs}, {"--ro-allow-gid", *roAllowGID, &o.roAllowGIDs},
	} {
		if !isSet(fs, strings.TrimPrefix(a.flag, "--")) {
			continue
		}
		if *a.ids, err = unixsock.SplitIDList(a.list); err != nil {
			return nil, usagef("%s: %v", a.flag, err)
		}
	}
	if !isSet(fs, "ro-allow-uid") {
		o.roAllowUIDs = o.allowUIDs
	}
	if !isSet(fs, "ro-allow-gid") {
		o.roAllowGIDs = o.allowGIDs
	}
	if orphan := setWithPrefix(fs, "ro-"); orphan != "" && o.listenRO == "" {
		return nil, usagef("--%s needs --listen-ro", orphan)
	}
	if orphan := setWithPrefix(fs, "console-log-"); orphan != "" && o.consoleLog == "" {
		return nil, usagef("--%s needs --console-log", orphan)
	}
	if o.logOptions.MaxSize, err = parseSize(*logMaxSize); err != nil {
		return nil, usagef("--console-log-max-size: %v", err)
	}
	if o.logOptions.MaxFiles, err = strconv.Atoi(*logFiles); err != nil || o.logOptions.MaxFiles < 0 {
		return nil, usagef("--console-log-max-files: %q is not a whole number of at least 0", *logFiles)
	}
	switch *logFormat {
	case "text":
	case "json":
		o.logJSON = true
	default:
		return nil, usagef("--log-format: %q is not text or json", *logFormat)
	}
	return o, nil
}

// parseUpstreamOrPattern parses --upstream: one upstream, or, when its
// path holds a "*", the pattern of host mode.
func parseUpstreamOrPattern(spec string, o *options) error {
	if !strings.Contains(spec, "*") {
		var err error
		if o.upstream, err = upstream.ParseUpstream(spec); err != nil {
			return usagef("--upstream: %v", err)
		}
		return nil
	}
	kind, path, found := strings.Cut(spec, ":")
	if !found || (kind != "unix" && kind != "pty") {
		return usagef("--upstream: %q: a pattern ('*') needs the kind unix: or pty:", spec)
	}
	p, err := host.ParsePattern(path)
	if err != nil {
		return usagef("--upstream: %v", err)
	}
	o.pattern, o.upstreamKind = &p, kind
	return nil
}

// checkTemplates applies the rules of {name} and {dir}: with a pattern,
// --listen must hold one of them, and so must --listen-ro and
// --console-log when given (each console needs paths of its own); without
// one they mean nothing, and neither do the host-mode flags.
func checkTemplates(fs *flag.FlagSet, o *options, maxConsoles, retireAfter string) error {
	paths := []struct{ flag, path string }{{"--listen", o.listen}, {"--listen-ro", o.listenRO}, {"--console-log", o.consoleLog}}
	if host.HasPlaceholder(o.status) {
		return usagef("--status: one status socket serves every console; it takes no {name} or {dir}")
	}
	if o.pattern == nil {
		for _, p := range paths {
			if host.HasPlaceholder(p.path) {
				return usagef("%s: {name} and {dir} need an --upstream pattern with a '*'", p.flag)
			}
		}
		for _, f := range []string{"max-consoles", "retire-after"} {
			if isSet(fs, f) {
				return usagef("--%s needs an --upstream pattern with a '*'", f)
			}
		}
		return nil
	}
	for _, p := range paths {
		if p.path == "" {
			continue
		}
		if !host.HasPlaceholder(p.path) {
			return usagef("%s: with an --upstream pattern it must hold {name} or {dir}, so that each console has its own", p.flag)
		}
		// /srv/consoles/vm-*.sock: every console's {dir} is /srv/consoles.
		if o.pattern.Rest == "" && !strings.Contains(p.path, "{name}") {
			return usagef("%s: the '*' is in the socket's own name, so {dir} is the same for every console: it must hold {name}", p.flag)
		}
	}
	// The proxy's own sockets must not be consoles themselves: each would
	// proxy the one before, to the length limit.
	upPath := o.pattern.Path(sample)
	for _, p := range []struct{ flag, path string }{{"--listen", o.listen}, {"--listen-ro", o.listenRO}, {"--status", o.status}} {
		if p.path == "" {
			continue
		}
		expanded := host.Expand(p.path, sample, upPath)
		if resolvePath(expanded) == resolvePath(upPath) {
			continue // refused below as the same file
		}
		// As written, and with the symlinks on the way resolved on both
		// sides (a relative path, a symlinked directory).
		resolved := *o.pattern
		resolved.Parent = resolvePath(resolved.Parent)
		_, asWritten := o.pattern.MatchPath(expanded)
		_, asResolved := resolved.MatchPath(resolvePath(expanded))
		if asWritten || asResolved {
			return usagef("%s: %s matches the --upstream pattern %s: the proxy's own sockets would be taken for consoles", p.flag, p.path, o.pattern)
		}
	}
	if o.exitWithUpstream {
		return usagef("--exit-with-upstream does not go with an --upstream pattern: host mode serves consoles as they come and go")
	}
	var err error
	if o.maxConsoles, err = strconv.Atoi(maxConsoles); err != nil || o.maxConsoles < 1 {
		return usagef("--max-consoles: %q is not a whole number of at least 1", maxConsoles)
	}
	if o.retireAfter, err = time.ParseDuration(retireAfter); err != nil || o.retireAfter <= 0 {
		return usagef("--retire-after: %q is not a positive duration such as 30s or 2m", retireAfter)
	}
	return nil
}

// checkDistinctPaths refuses two of the proxy's paths that name the same
// file however they are spelled (a relative and an absolute path, a
// symlink on the way): the proxy would bind over its own upstream, or log
// into its own socket. With a pattern the templates are compared as they
// expand for one name.
func checkDistinctPaths(o *options) error {
	type named struct{ flag, path string }
	var paths []named
	expand := func(s string) string { return s }
	if o.pattern != nil {
		upPath := o.pattern.Path(sample)
		expand = func(s string) string { return host.Expand(s, sample, upPath) }
		paths = append(paths, named{"--upstream", upPath})
	} else if p := upstreamPath(o.upstream); p != "" {
		paths = append(paths, named{"--upstream", p})
	}
	for _, p := range []named{{"--listen", o.listen}, {"--listen-ro", o.listenRO}, {"--status", o.status}, {"--console-log", o.consoleLog}} {
		if p.path != "" {
			paths = append(paths, named{p.flag, expand(p.path)})
		}
	}
	seen := make(map[string]string)
	for _, p := range paths {
		key := resolvePath(p.path)
		if other, ok := seen[key]; ok {
			return usagef("%s and %s name the same file %s", other, p.flag, p.path)
		}
		seen[key] = p.flag
	}
	return nil
}

// upstreamPath returns the filesystem path an upstream uses, if any.
func upstreamPath(up upstream.Upstream) string {
	switch u := up.(type) {
	case *upstream.UnixUpstream:
		return u.Path
	case *upstream.ListenUpstream:
		return u.Path
	case *upstream.PTYUpstream:
		return u.Path
	}
	return ""
}

// sample is the name templates are expanded with to check them before any
// console exists.
const sample = "consoleproxy-name"

// resolvePath spells path as the system would resolve it: absolute, with
// the symlinks of its longest existing prefix resolved.
func resolvePath(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return filepath.Clean(path)
	}
	rest := ""
	for dir := abs; ; dir = filepath.Dir(dir) {
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			return filepath.Join(real, rest)
		}
		if filepath.Dir(dir) == dir {
			return abs
		}
		rest = filepath.Join(filepath.Base(dir), rest)
	}
}

// setWithPrefix returns a flag given on the command line whose name starts
// with prefix, or "".
func setWithPrefix(fs *flag.FlagSet, prefix string) string {
	var name string
	fs.Visit(func(f *flag.Flag) {
		if strings.HasPrefix(f.Name, prefix) {
			name = f.Name
		}
	})
	return name
}

// isSet reports whether the flag was given on the command line.
func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// parseMode parses an octal permission mode, 0001 to 0777: no setuid,
// setgid or sticky bits, which mean nothing on a socket.
func parseMode(s string) (os.FileMode, error) {
	mode, err := strconv.ParseUint(s, 8, 32)
	if err != nil || mode > 0o777 || mode == 0 {
		return 0, fmt.Errorf("%q is not an octal mode from 0001 to 0777", s)
	}
	return os.FileMode(mode), nil
}

// parseSize parses a byte count with an optional binary unit, case
// insensitive: B, K or KiB, M or MiB, G or GiB.
func parseSize(s string) (int64, error) {
	digits := strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	if digits < 0 {
		digits = len(s)
	}
	if digits == 0 {
		return 0, fmt.Errorf("%q is not a size (want a whole number with an optional unit)", s)
	}
	num, unit := s[:digits], strings.ToLower(s[digits:])
	var mult int64
	switch unit {
	case "", "b":
		mult = 1
	case "k", "kib":
		mult = 1 << 10
	case "m", "mib":
		mult = 1 << 20
	case "g", "gib":
		mult = 1 << 30
	default:
		return 0, fmt.Errorf("%q: unknown unit %q (use B, KiB, MiB or GiB)", s, s[digits:])
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return n * mult, nil
}
