module github.com/consoleproxy/consoleproxy

go 1.26.0

require (
	github.com/hashicorp/go-hclog v1.6.3
	github.com/oklog/run v1.2.0
	go.uber.org/goleak v1.3.0
	golang.org/x/sys v0.49.0
	golang.org/x/term v0.47.0
)

require (
	github.com/fatih/color v1.13.0 // indirect
	github.com/mattn/go-colorable v0.1.12 // indirect
	github.com/mattn/go-isatty v0.0.14 // indirect
)
