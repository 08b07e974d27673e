module gochat-examples/client

go 1.19
