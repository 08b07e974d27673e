// Command shutdown is an echo server that shuts down gracefully: on SIGTERM
// or SIGINT it stops accepting, lets every handler finish the line it is
// working on, tells each client "bye", waits for all handlers, and exits 0.
// The line "slow" takes 300 ms to answer, to show work outliving the signal.
// Twin: examples/shutdown.py.
//
//	go run . -addr 127.0.0.1:0
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "listen address (port 0: the kernel picks)")
	flag.Parse()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())

	// ctx is canceled by the first SIGTERM or SIGINT.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		ln.Close() // stop accepting: Accept returns an error
	}()

	var wg sync.WaitGroup // counts the running handlers
	for id := 1; ; id++ {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			log.Print(err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		wg.Add(1)
		go func(conn net.Conn, id int) {
			defer wg.Done()
			handleConn(ctx, conn, id)
		}(conn, id)
	}
	fmt.Println("shutdown: stopped accepting")
	wg.Wait()
	fmt.Println("shutdown: every handler done")
}

func handleConn(ctx context.Context, conn net.Conn, id int) {
	defer conn.Close()

	// On shutdown, wake the read below: CloseRead (shutdown(SHUT_RD)) makes
	// a blocked or later Read return io.EOF. The watcher ends with the handler.
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-ctx.Done():
			conn.(*net.TCPConn).CloseRead()
		case <-finished:
		}
	}()

	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			break
		}
		line = strings.TrimSuffix(line, "\n")
		if line == "slow" {
			fmt.Printf("conn %d: working\n", id)
			time.Sleep(300 * time.Millisecond)
			line = "slow done"
		}
		fmt.Fprintln(conn, line)
	}
	if ctx.Err() != nil {
		fmt.Fprintln(conn, "bye")
	}
}
