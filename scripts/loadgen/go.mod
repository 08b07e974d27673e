module gochat-loadgen

go 1.19
