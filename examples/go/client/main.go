// Command client dials a line server, sends each argument as a line (or a
// fixed script), and prints every reply. Twin: examples/client.py.
//
//	go run . -addr 127.0.0.1:9200 hello world
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

var script = []string{"hello", "gochat", "bye"}

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "server address")
	timeout := flag.Duration("timeout", 5*time.Second, "dial and reply timeout")
	flag.Parse()
	lines := flag.Args()
	if len(lines) == 0 {
		lines = script
	}

	conn, err := net.DialTimeout("tcp", *addr, *timeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	fmt.Println("connected")

	r := bufio.NewReader(conn)
	for _, line := range lines {
		fmt.Println(">", line)
		// net.Conn writes are not buffered: one Write, one syscall.
		if _, err := conn.Write([]byte(line + "\n")); err != nil {
			fmt.Fprintln(os.Stderr, "write:", err)
			os.Exit(1)
		}
		conn.SetReadDeadline(time.Now().Add(*timeout))
		reply, err := r.ReadString('\n')
		if err != nil {
			fmt.Println("server closed")
			os.Exit(1)
		}
		fmt.Println("<", strings.TrimSuffix(reply, "\n"))
	}
	fmt.Println("done")
}
