module gochat-examples/syncpool

go 1.19
