// Command heartbeat pings every client each -ping and closes a client that
// has sent nothing for -wait: the shape of gorilla/websocket's chat client
// (a ticker goroutine writes pings, the reader extends its read deadline on
// every line). Any line counts as a sign of life; clients answer "pong".
// Twin: examples/heartbeat.py.
//
//	go run . -addr 127.0.0.1:0 -ping 300ms -wait 450ms
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "listen address (port 0: the kernel picks)")
	ping := flag.Duration("ping", 300*time.Millisecond, "time between pings")
	wait := flag.Duration("wait", 450*time.Millisecond, "silence after which a client is closed")
	flag.Parse()
	if *ping >= *wait {
		log.Fatal("-ping must be shorter than -wait, or a live client is closed before its ping")
	}

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
		go handleConn(conn, id, *ping, *wait)
	}
}

func handleConn(conn net.Conn, id int, ping, wait time.Duration) {
	defer conn.Close()
	fmt.Printf("conn %d: open\n", id)

	// Two goroutines write to conn: the pinger and the reader (its
	// "timeout"). The mutex keeps their lines whole.
	var mu sync.Mutex
	write := func(s string) error {
		mu.Lock()
		defer mu.Unlock()
		_, err := io.WriteString(conn, s+"\n")
		return err
	}

	done := make(chan struct{}) // closed when the reader is finished
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the pinger
		defer wg.Done()
		ticker := time.NewTicker(ping)
		defer ticker.Stop()
		for {
			select {
			case <-ticker.C:
				if write("ping") != nil {
					return
				}
			case <-done:
				return
			}
		}
	}()

	r := bufio.NewReader(conn)
	for {
		conn.SetReadDeadline(time.Now().Add(wait))
		line, err := r.ReadString('\n')
		if errors.Is(err, os.ErrDeadlineExceeded) {
			fmt.Printf("conn %d: read deadline exceeded, closing\n", id)
			write("timeout")
			break
		}
		if err != nil {
			break
		}
		fmt.Printf("conn %d: %s\n", id, strings.TrimSuffix(line, "\n"))
	}
	close(done)
	wg.Wait() // the pinger has stopped writing before conn.Close
	fmt.Printf("conn %d: closed\n", id)
}
