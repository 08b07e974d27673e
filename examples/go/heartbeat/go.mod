module gochat-examples/heartbeat

go 1.19
