// Command semaphore is an echo server that serves at most -max clients at
// once. A semaphore channel holds the slots; a client arriving when all are
// taken is told "busy" and closed at once, never left waiting in the kernel
// backlog (gochat answers too_many_connections the same way).
// Twin: examples/semaphore.py.
//
//	go run . -addr 127.0.0.1:0 -max 2
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "listen address (port 0: the kernel picks)")
	max := flag.Int("max", 2, "most clients served at once")
	flag.Parse()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())

	// A counting semaphore: its capacity is the number of slots. Sending
	// takes a slot, receiving gives one back.
	sem := make(chan struct{}, *max)

	for id := 1; ; id++ {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		select {
		case sem <- struct{}{}: // a slot: serve in its own goroutine
			go func(conn net.Conn, id int) {
				defer func() {
					<-sem // give the slot back, even if handleConn panics
					fmt.Printf("conn %d: released\n", id)
				}()
				handleConn(conn, id)
			}(conn, id)
		default: // every slot taken: refuse now (without default, Accept would wait)
			fmt.Printf("conn %d: busy\n", id)
			fmt.Fprintln(conn, "busy") // a write error changes nothing: it is closed anyway
			conn.Close()
		}
	}
}

func handleConn(conn net.Conn, id int) {
	defer conn.Close()
	fmt.Printf("conn %d: serving\n", id)
	fmt.Fprintf(conn, "welcome %d\n", id)
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := conn.Write([]byte(line)); err != nil {
			return
		}
	}
}
