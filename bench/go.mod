module github.com/consoleproxy/consoleproxy/bench

go 1.26
