"""gochat: a TCP chat server on gevent, one greenlet per connection like Go's goroutines."""

__version__ = "0.1.0"
