package unixsock

import (
	"strings"
	"testing"
)

func FuzzSplitIDList(f *testing.F) {
	for _, s := range []string{"0", "root,nobody", "1, 2", ",", "a,,b", "", " "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, list string) {
		parts, err := SplitIDList(list)
		if err != nil {
			return
		}
		for _, p := range parts {
			if p == "" || strings.Contains(p, ",") {
				t.Fatalf("SplitIDList(%q) gave element %q", list, p)
			}
		}
		if again, err := SplitIDList(strings.Join(parts, ",")); err != nil || strings.Join(again, ",") != strings.Join(parts, ",") {
			t.Fatalf("SplitIDList(%q) = %q does not round-trip", list, parts)
		}
	})
}
