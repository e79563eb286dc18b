package main

import (
	"fmt"
	"strconv"
	"testing"
)

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "4096", "4K", "1MiB", "16mib", "1G", "", "1.5M", "-1", "99999999999999999999G", "1 M", "0x10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		// Whatever was accepted means the same as its byte count.
		if back, err := parseSize(strconv.FormatInt(n, 10) + "B"); err != nil || back != n {
			t.Fatalf("parseSize(%q) = %d, but %dB parses to %d, %v", s, n, n, back, err)
		}
	})
}

func FuzzParseMode(f *testing.F) {
	for _, s := range []string{"0600", "600", "0660", "777", "0", "01777", "0999", "", "rw", "-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := parseMode(s)
		if err != nil {
			return
		}
		if m == 0 || m > 0o777 {
			t.Fatalf("parseMode(%q) = %o", s, m)
		}
		if back, err := parseMode(fmt.Sprintf("%o", uint32(m))); err != nil || back != m {
			t.Fatalf("parseMode(%q) = %o does not round-trip: %o, %v", s, m, back, err)
		}
	})
}
