# Conveniences; the README's two commands need none of this.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo unknown)

.PHONY: build test guest demo bench

# A static binary with the version stamped in.
build:
	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o consoleproxy ./cmd/consoleproxy

test:
	go test -race ./...

# The tiny Linux guest the QEMU test and the demo boot (cached in .cache/guest).
guest:
	scripts/guest-assets.sh

# The process-level benchmark: a table (bench/results.md) and a plot
# (bench/results.svg), with socat and a direct client in the same run.
bench:
	cd bench && go run . -out .

# A VM under QEMU with its console behind consoleproxy; Ctrl-C stops it.
demo: build
	scripts/demo.sh
