// Package e2e holds end-to-end tests: the real consoleproxy binary, built
// once per run, with real clients (socat, nc) and real VMMs. Tests that need
// a program that is not installed skip and say which; .ci/run installs them
// all.
package e2e
