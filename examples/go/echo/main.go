// Command echo writes every line a client sends back to it: the smallest
// goroutine-per-connection server. Twin: examples/echo.py.
//
//	go run . -addr 127.0.0.1:0
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
	"strings"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "listen address (port 0: the kernel picks)")
	flag.Parse()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())

	// The accept loop: one goroutine per connection.
	for id := 1; ; id++ {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go handleConn(conn, id)
	}
}

// handleConn owns conn: it alone reads and writes it, and closes it.
func handleConn(conn net.Conn, id int) {
	defer conn.Close()
	fmt.Printf("conn %d: open\n", id)
	r := bufio.NewReader(conn) // a read buffer: one syscall fills many lines
	w := bufio.NewWriter(conn) // a write buffer: Flush is the syscall
	for {
		line, err := r.ReadString('\n')
		if err != nil { // io.EOF: the client closed (a partial last line is dropped)
			break
		}
		fmt.Printf("conn %d: %s\n", id, strings.TrimSuffix(line, "\n"))
		w.WriteString(line)
		if err := w.Flush(); err != nil {
			break
		}
	}
	fmt.Printf("conn %d: closed\n", id)
}
