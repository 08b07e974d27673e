module gochat-examples/shutdown

go 1.19
