module gochat-examples/echo

go 1.19
