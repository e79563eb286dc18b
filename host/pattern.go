package host

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// Pattern is an upstream path with one "*" within one of its elements,
// such as /run/vms/*/serial.sock or /srv/consoles/vm-*.sock. What the "*"
// matches is a console's name.
type Pattern struct {
	// Parent is the directory whose entries the "*" element matches.
	Parent string
	// Prefix and Suffix surround the "*" in its element.
	Prefix, Suffix string
	// Rest is the path below the matched element; "" when the matched
	// element is the upstream itself.
	Rest string
}

// ErrNotPattern is returned by ParsePattern for a path without "*".
var ErrNotPattern = errors.New("not a pattern")

// ParsePattern parses path as a Pattern. It returns ErrNotPattern when path
// holds no "*", and an error for more than one.
func ParsePattern(path string) (Pattern, error) {
	switch n := strings.Count(path, "*"); {
	case n == 0:
		return Pattern{}, ErrNotPattern
	case n > 1:
		return Pattern{}, fmt.Errorf("%s has %d '*'; a pattern has one", path, n)
	}
	path = filepath.Clean(path)
	elems := strings.Split(path, "/")
	for i, e := range elems {
		before, after, found := strings.Cut(e, "*")
		if !found {
			continue
		}
		parent := strings.Join(elems[:i], "/")
		switch {
		case parent == "" && strings.HasPrefix(path, "/"):
			parent = "/"
		case parent == "":
			parent = "."
		}
		return Pattern{Parent: parent, Prefix: before, Suffix: after, Rest: strings.Join(elems[i+1:], "/")}, nil
	}
	return Pattern{}, ErrNotPattern // not reached: the count said one
}

// Match returns the name that an entry of Parent gives, if it matches.
// The name is never empty and never starts with a dot: hidden entries
// (such as the private directories that socket creation uses) are not
// consoles.
func (p Pattern) Match(entry string) (name string, ok bool) {
	if len(entry) < len(p.Prefix)+len(p.Suffix) || !strings.HasPrefix(entry, p.Prefix) || !strings.HasSuffix(entry, p.Suffix) {
		return "", false
	}
	name = entry[len(p.Prefix) : len(entry)-len(p.Suffix)]
	if name == "" || strings.HasPrefix(entry, ".") || strings.Contains(name, "/") {
		return "", false
	}
	return name, true
}

// MatchPath returns the name of the console whose upstream path is path,
// if path matches the pattern.
func (p Pattern) MatchPath(path string) (name string, ok bool) {
	path = filepath.Clean(path)
	rest := path
	if p.Rest != "" {
		var found bool
		if rest, found = strings.CutSuffix(path, "/"+p.Rest); !found {
			return "", false
		}
	}
	if filepath.Dir(rest) != p.Parent {
		return "", false
	}
	return p.Match(filepath.Base(rest))
}

// Entry returns the entry of Parent for name.
func (p Pattern) Entry(name string) string { return p.Prefix + name + p.Suffix }

// Path returns the upstream path of console name.
func (p Pattern) Path(name string) string {
	return filepath.Join(p.Parent, p.Entry(name), p.Rest)
}

// String returns the pattern as it was written (cleaned).
func (p Pattern) String() string { return filepath.Join(p.Parent, p.Entry("*"), p.Rest) }

// Expand replaces {name} with name and {dir} with the directory of the
// console's upstream path, in a --listen, --listen-ro or --console-log
// template.
func Expand(template, name, upstreamPath string) string {
	return strings.NewReplacer("{name}", name, "{dir}", filepath.Dir(upstreamPath)).Replace(template)
}

// HasPlaceholder reports whether s holds {name} or {dir}.
func HasPlaceholder(s string) bool {
	return strings.Contains(s, "{name}") || strings.Contains(s, "{dir}")
}
