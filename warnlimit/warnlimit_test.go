package warnlimit

import (
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestRepeatedWarningsAreCountedNotRepeated(t *testing.T) {
	logs := &strings.Builder{}
	l := New(hclog.New(&hclog.LoggerOptions{Output: logs}), "client refused: access denied")
	for i := range 448 {
		l.Warn("uid", 65534+i)
	}
	if n := strings.Count(logs.String(), "client refused: access denied"); n != 1 {
		t.Fatalf("%d lines for 448 refusals within the interval, want 1:\n%s", n, logs)
	}
	l.Stop()
	if !strings.Contains(logs.String(), "client refused: access denied (repeated): times=447") {
		t.Errorf("the held-back refusals were not counted:\n%s", logs)
	}
	l.Warn("after", "stop")
	if n := strings.Count(logs.String(), "\n"); n != 2 {
		t.Errorf("%d lines, want 2:\n%s", n, logs)
	}
}
