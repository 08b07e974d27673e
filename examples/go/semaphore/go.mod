module gochat-examples/semaphore

go 1.19
