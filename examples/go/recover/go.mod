module gochat-examples/recover

go 1.19
