module gochat-examples/chat

go 1.19
