package unixsock

import (
	"fmt"
	"os/user"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Access says which peers may connect to a served socket, by the
// credentials the kernel reports for them (SO_PEERCRED), which a client
// cannot forge. A peer is allowed when its uid is in UIDs or its primary
// gid is in GIDs; uid 0 is always allowed, since root can reach the VM's
// console by other means anyway. A nil *Access allows everyone whom the
// socket's mode lets connect.
type Access struct {
	UIDs []uint32
	GIDs []uint32
}

// Allows reports whether a peer with cred may connect.
func (a *Access) Allows(cred unix.Ucred) bool {
	if a == nil || cred.Uid == 0 {
		return true
	}
	return slices.Contains(a.UIDs, cred.Uid) || slices.Contains(a.GIDs, cred.Gid)
}

// SplitIDList splits a comma-separated list of ids or names, rejecting
// empty elements. It looks nothing up.
func SplitIDList(list string) ([]string, error) {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		parts[i] = strings.TrimSpace(p)
		if parts[i] == "" {
			return nil, fmt.Errorf("%q has an empty element", list)
		}
	}
	return parts, nil
}

// LookupUIDs resolves user names or numeric uids.
func LookupUIDs(names []string) ([]uint32, error) {
	return lookupIDs(names, func(name string) (string, error) {
		u, err := user.Lookup(name)
		if err != nil {
			return "", err
		}
		return u.Uid, nil
	})
}

// LookupGIDs resolves group names or numeric gids.
func LookupGIDs(names []string) ([]uint32, error) {
	return lookupIDs(names, func(name string) (string, error) {
		g, err := user.LookupGroup(name)
		if err != nil {
			return "", err
		}
		return g.Gid, nil
	})
}

func lookupIDs(names []string, lookup func(string) (string, error)) ([]uint32, error) {
	ids := make([]uint32, 0, len(names))
	for _, name := range names {
		id, err := strconv.ParseUint(name, 10, 32)
		if err != nil {
			s, lerr := lookup(name)
			if lerr != nil {
				return nil, lerr
			}
			if id, err = strconv.ParseUint(s, 10, 32); err != nil {
				return nil, fmt.Errorf("%s has id %q", name, s)
			}
		}
		ids = append(ids, uint32(id))
	}
	return ids, nil
}
