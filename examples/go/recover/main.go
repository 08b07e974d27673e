// Command recover serves "get N" (the N-th item of a list) and has a bug:
// it never checks N, so "get 7" panics. The handler recovers: the panic is
// logged with its stack, that client is told "internal error" and closed,
// and every other client goes on as if nothing happened.
// Twin: examples/recover.py.
//
//	go run . -addr 127.0.0.1:0
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
	"runtime/debug"
	"strconv"
	"strings"
)

var items = []string{"apple", "banana", "cherry"}

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "listen address (port 0: the kernel picks)")
	flag.Parse()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())
	for id := 1; ; id++ {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go handleConn(conn, id)
	}
}

func handleConn(conn net.Conn, id int) {
	defer conn.Close()
	// Without this, a panic in any goroutine ends the whole process, and
	// every other client with it.
	defer func() {
		if r := recover(); r != nil {
			log.Printf("conn %d: panic: %v\n%s", id, r, debug.Stack())
			fmt.Printf("conn %d: recovered, closing\n", id)
			fmt.Fprintln(conn, "internal error")
		}
	}()
	fmt.Printf("conn %d: open\n", id)

	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			fmt.Printf("conn %d: closed\n", id)
			return
		}
		cmd, arg, _ := strings.Cut(strings.TrimSpace(line), " ")
		switch cmd {
		case "get":
			n, err := strconv.Atoi(arg)
			if err != nil {
				fmt.Fprintln(conn, "not a number")
				continue
			}
			fmt.Fprintln(conn, items[n]) // the bug: panics when n is out of range
		default:
			fmt.Fprintln(conn, "unknown command")
		}
	}
}
