// Command chat is the classic Go chat broadcaster, kept as a migration
// reference: every line any client sends is written to every client,
// the sender included.
//
// The shape is the one Go developers expect: one goroutine per connection
// for reading, one per connection for writing, and a single broadcaster
// goroutine that owns the set of clients. Nothing is shared under a lock;
// goroutines talk over channels.
package main

import (
	"bufio"
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// client is one connection. Its out channel is its outbound queue: the
// broadcaster sends to it and only the client's writer goroutine receives.
type client struct {
	conn net.Conn
	out  chan []byte
}

// broadcaster owns clients: only run() reads or writes the map, so it
// needs no mutex. Other goroutines ask for changes through the channels.
type broadcaster struct {
	register   chan *client
	unregister chan *client
	broadcast  chan []byte
	clients    map[*client]bool
}

func newBroadcaster() *broadcaster {
	return &broadcaster{
		register:   make(chan *client),
		unregister: make(chan *client),
		// A little slack so readers rarely wait for the broadcaster.
		broadcast: make(chan []byte, 64),
		clients:   make(map[*client]bool),
	}
}

// run is the only place that touches b.clients. It also is the only place
// that closes a client's out channel, so it is closed exactly once.
func (b *broadcaster) run() {
	for {
		select {
		case c := <-b.register:
			b.clients[c] = true
		case c := <-b.unregister:
			// The client may already be gone (dropped as slow below).
			if b.clients[c] {
				b.drop(c)
			}
		case line := <-b.broadcast:
			for c := range b.clients {
				// Never block on one client: a full queue means it is
				// not keeping up, and waiting would stall everyone.
				select {
				case c.out <- line:
				default:
					b.drop(c)
				}
			}
		}
	}
}

// drop forgets c and closes its queue; the writer then ends and closes
// the socket, which in turn ends the reader.
func (b *broadcaster) drop(c *client) {
	delete(b.clients, c)
	close(c.out)
}

// handleConn runs the reader in the connection's own goroutine. Blocking
// reads are cheap in Go: the runtime parks the goroutine on the netpoller.
func handleConn(b *broadcaster, conn net.Conn, queue int) {
	c := &client{conn: conn, out: make(chan []byte, queue)}
	b.register <- c
	go c.writeLoop()

	sc := bufio.NewScanner(conn)
	for sc.Scan() {
		// Scanner reuses its buffer; the line is shared by every
		// client's queue, so it needs its own copy (with the newline).
		line := make([]byte, len(sc.Bytes())+1)
		copy(line, sc.Bytes())
		line[len(line)-1] = '\n'
		b.broadcast <- line
	}
	// EOF, error, or the writer closed the socket.
	b.unregister <- c
}

// writeLoop is the only code that writes to the socket. It coalesces:
// bytes go into a bufio.Writer and are flushed (one syscall) only when
// the queue is empty, so a burst of lines costs one write, not many.
func (c *client) writeLoop() {
	defer c.conn.Close()
	w := bufio.NewWriter(c.conn)
	for line := range c.out {
		if _, err := w.Write(line); err != nil {
			return
		}
		if len(c.out) == 0 {
			if err := w.Flush(); err != nil {
				return
			}
		}
	}
	// out was closed by the broadcaster: the client was dropped.
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9100", "listen address")
	queue := flag.Int("queue", 256, "per-client outbound queue, in lines; a client whose queue is full is dropped")
	flag.Parse()

	// Go sets TCP_NODELAY on every TCP connection by default, so small
	// lines are not held back by Nagle's algorithm.
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("chat: listening on %s", ln.Addr())

	// On SIGINT/SIGTERM, closing the listener makes Accept fail, which
	// ends the accept loop below.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()

	b := newBroadcaster()
	go b.run()

	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				log.Print("chat: shutting down")
				return // exit status 0; open connections die with the process
			}
			// Out of file descriptors and the like: log, back off a
			// little so the loop does not spin, and keep accepting.
			log.Print(err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handleConn(b, conn, *queue)
	}
}
