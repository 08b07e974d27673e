// Command syncpool answers each line with its length and its upper-case
// form, building every reply in a scratch buffer from a sync.Pool, so a busy
// server reuses a few buffers instead of allocating one per line.
// Twin: examples/syncpool.py.
//
//	go run . -addr 127.0.0.1:0
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"strings"
	"sync"
)

// maxPooled: a buffer that grew past this is left to the GC, so one huge
// line does not pin a huge buffer in the pool forever (golang/go#23199).
const maxPooled = 64 << 10

// bufPool hands out scratch buffers. Get may return one another goroutine
// used; the GC may empty the pool at any time, so it is a cache, not a count.
var bufPool = sync.Pool{
	New: func() any { return new(bytes.Buffer) },
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9200", "listen address (port 0: the kernel picks)")
	flag.Parse()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())
	for {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go handleConn(conn)
	}
}

func handleConn(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if err := reply(conn, strings.TrimSuffix(line, "\n")); err != nil {
			return
		}
	}
}

func reply(w io.Writer, line string) error {
	buf := bufPool.Get().(*bytes.Buffer)
	buf.Reset() // a pooled buffer holds whatever its last user wrote
	defer func() {
		if buf.Cap() <= maxPooled {
			bufPool.Put(buf)
		}
	}()
	fmt.Fprintf(buf, "%d %s\n", len(line), strings.ToUpper(line))
	_, err := w.Write(buf.Bytes()) // Write is done with buf when it returns: safe to Put
	return err
}
