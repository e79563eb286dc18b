package watch

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// events collects what a watch delivers.
func events(t *testing.T, w *Watcher, dir string) (<-chan Event, func()) {
	t.Helper()
	ch := make(chan Event, 64)
	cancel, err := w.Watch(dir, func(e Event) { ch <- e })
	if err != nil {
		t.Fatal(err)
	}
	return ch, cancel
}

func next(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(20 * time.Second):
		t.Fatal("no event")
		return Event{}
	}
}

func TestManyWatchesShareOneInstance(t *testing.T) {
	w := New()
	defer w.Close()
	base := t.TempDir()
	var chans []<-chan Event
	var cancels []func()
	for i := range 50 {
		dir := filepath.Join(base, "vm"+string(rune('a'+i%26))+string(rune('a'+i/26)))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		ch, cancel := events(t, w, dir)
		chans, cancels = append(chans, ch), append(cancels, cancel)
	}
	// A second watch of the same directory shares its kernel watch.
	again, cancelAgain := events(t, w, filepath.Join(base, "vmaa"))
	if n := w.Instances(); n != 1 {
		t.Fatalf("%d instances for 51 watches, want 1", n)
	}
	if err := os.WriteFile(filepath.Join(base, "vmaa", "serial.sock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if e := next(t, chans[0]); e.Name != "serial.sock" {
		t.Errorf("event %+v, want serial.sock", e)
	}
	if e := next(t, again); e.Name != "serial.sock" {
		t.Errorf("second watch: event %+v, want serial.sock", e)
	}
	// Removing a directory ends its watches with Gone.
	if err := os.RemoveAll(filepath.Join(base, "vmba")); err != nil {
		t.Fatal(err)
	}
	for {
		if e := next(t, chans[1]); e.Gone {
			break
		}
	}
	cancelAgain()
	for _, c := range cancels {
		c()
	}
	// The last watch gone, the instance is closed.
	if n := w.Instances(); n != 0 {
		t.Errorf("%d instances with no watch, want 0", n)
	}
}

func TestHoldKeepsTheInstanceBetweenWatches(t *testing.T) {
	w := New()
	defer w.Close()
	release, err := w.Hold()
	if err != nil {
		t.Fatal(err)
	}
	_, cancel := events(t, w, t.TempDir())
	cancel()
	if n := w.Instances(); n != 1 {
		t.Errorf("%d instances while held, want 1", n)
	}
	release()
	release()
	if n := w.Instances(); n != 0 {
		t.Errorf("%d instances after release, want 0", n)
	}
}

func TestWatchOfAMissingDirectoryFails(t *testing.T) {
	w := New()
	defer w.Close()
	if _, err := w.Watch(filepath.Join(t.TempDir(), "missing"), func(Event) {}); err == nil {
		t.Fatal("watching a missing directory succeeded")
	}
	if n := w.Instances(); n != 0 {
		t.Errorf("%d instances after a failed watch, want 0", n)
	}
	w.Close()
	if _, err := w.Hold(); err != ErrClosed {
		t.Errorf("Hold after Close: %v, want ErrClosed", err)
	}
}
