// Package chaos is the reliability suite: it attacks the real consoleproxy
// binary the way months beside a VM will (VMM restarts, client storms,
// stuck clients, a full disk, signal storms, kill -9, bad invocations) and
// reports figures.
//
// go test ./chaos runs the short mode; CONSOLEPROXY_CHAOS=full runs the
// full counts (.ci/run does, with -v, and prints the "figure:" lines).
package chaos
