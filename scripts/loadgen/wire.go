package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// conn is one client connection. One goroutine reads it (r is not shared);
// writes may come from a sender goroutine and from the reader (pong), so
// w is guarded by mu.
type conn struct {
	nc net.Conn
	r  *bufio.Reader

	mu sync.Mutex
	w  *bufio.Writer
}

// dialer spreads connections over source addresses 127.0.0.1..127.0.0.K:
// one (source, destination) pair has only ~28k ephemeral ports.
type dialer struct {
	addr    string
	srcs    int
	timeout time.Duration
	readBuf int
	n       atomic.Uint64
}

func newDialer(cfg *config) *dialer {
	return &dialer{addr: cfg.addr, srcs: cfg.srcs, timeout: cfg.timeout, readBuf: cfg.readBuf}
}

func (d *dialer) dial() (*conn, error) {
	nd := net.Dialer{Timeout: d.timeout}
	if d.srcs > 1 {
		i := d.n.Add(1) - 1
		nd.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%uint64(d.srcs)))}
		nd.Control = bindAddressNoPort
	}
	nc, err := nd.Dial("tcp", d.addr)
	if err != nil {
		return nil, err
	}
	// Go sets TCP_NODELAY by default; small messages go out at once.
	// Most connections write only a hello, a join and pongs: a small
	// write buffer keeps thousands of idle connections cheap (fanout
	// senders get a bigger one).
	return &conn{nc: nc, r: bufio.NewReaderSize(nc, d.readBuf), w: bufio.NewWriterSize(nc, 512)}, nil
}

// ipBindAddressNoPort is IP_BIND_ADDRESS_NO_PORT (Linux 4.2+), missing
// from package syscall.
const ipBindAddressNoPort = 24

var noPortWarning sync.Once

// bindAddressNoPort lets connect(), not bind(), choose the source port.
// bind() with port 0 must find a port free for every destination and
// skips ports in TIME_WAIT: with thousands of them (after an earlier run)
// each dial scans the whole range. connect() picks a port free for this
// destination only, and may reuse TIME_WAIT ones (tcp_tw_reuse).
func bindAddressNoPort(network, address string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
	})
	if err != nil {
		return err
	}
	if serr != nil {
		noPortWarning.Do(func() { logf("IP_BIND_ADDRESS_NO_PORT: %v (dials may be slow)", serr) })
	}
	return nil
}

// readLine returns the next line without its "\n" or "\r\n". The slice is
// only valid until the next call. A partial line at EOF is dropped.
func (c *conn) readLine() ([]byte, error) {
	line, err := c.r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		// Rare (a gochat joined with a long member list): reassemble in a
		// fresh slice that is not kept, so idle connections stay small.
		long := append([]byte(nil), line...)
		for err == bufio.ErrBufferFull {
			line, err = c.r.ReadSlice('\n')
			long = append(long, line...)
		}
		line = long
	}
	if err != nil {
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// send writes b and flushes.
func (c *conn) send(b []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.w.Write(b); err != nil {
		return err
	}
	return c.w.Flush()
}

func (c *conn) close() { c.nc.Close() }

// bye asks a gochat server to end the session now (otherwise it is kept
// for resume_window), then closes. Best effort, bounded by a deadline.
func (c *conn) bye() {
	c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	c.send([]byte(`{"type":"bye"}` + "\n"))
}

// pong answers a gochat heartbeat ping with the same ts.
func (c *conn) pong(ts []byte) error {
	b := make([]byte, 0, 32+len(ts))
	b = append(b, `{"type":"pong","ts":`...)
	b = append(b, ts...)
	b = append(b, "}\n"...)
	return c.send(b)
}

// protoError is an {"type":"error"} from a gochat server, or an
// unexpected reply during the handshake.
type protoError struct{ code string }

func (e protoError) Error() string { return "server error " + e.code }

// hello sends a gochat hello and waits for welcome.
func (c *conn) hello(nick string, timeout time.Duration) error {
	b, _ := json.Marshal(map[string]any{"type": "hello", "v": 1, "nick": nick})
	return c.request(append(b, '\n'), "welcome", timeout)
}

// join sends a gochat join and waits for joined.
func (c *conn) join(room string, timeout time.Duration) error {
	b, _ := json.Marshal(map[string]any{"type": "join", "room": room})
	return c.request(append(b, '\n'), "joined", timeout)
}

// request sends req and reads until a message of type want (ok) or an
// error arrives; pings are answered, anything else (presence) skipped.
func (c *conn) request(req []byte, want string, timeout time.Duration) error {
	c.nc.SetDeadline(time.Now().Add(timeout))
	defer c.nc.SetDeadline(time.Time{})
	if err := c.send(req); err != nil {
		return err
	}
	var ev event
	for {
		line, err := c.readLine()
		if err != nil {
			return err
		}
		if err := ev.parse(line); err != nil {
			return protoError{"bad_json_from_server"}
		}
		switch string(ev.typ) {
		case want:
			return nil
		case "error":
			return protoError{string(ev.code)}
		case "ping":
			if err := c.pong(ev.ts); err != nil {
				return err
			}
		case "shutdown":
			return protoError{"shutdown"}
		}
	}
}

// event holds the fields of one gochat server message that the generator
// uses. Byte slices point into the line and are valid until the next read.
type event struct {
	typ   []byte
	text  []byte // "msg": unescaped text
	code  []byte // "error": code
	ts    []byte // "ping": raw JSON value, echoed in the pong
	id    int64  // "ack", "error", "msg": integer id
	hasID bool
}

// Message types whose other fields nobody reads: parsing stops at "type".
var skipRest = map[string]bool{"presence": true, "joined": true, "left": true, "who": true, "rooms": true, "history": true, "pong": true}

// parse fills ev from one JSON line without building a generic tree: it
// walks the top-level members and decodes only the ones it needs. A full
// json.Unmarshal per delivered message would make the generator, not the
// server, the bottleneck.
func (ev *event) parse(line []byte) error {
	*ev = event{}
	return walkObject(line, func(key, val []byte) bool {
		switch string(key) {
		case "type":
			ev.typ, _ = unquote(val)
			if skipRest[string(ev.typ)] {
				return false
			}
		case "text":
			ev.text, _ = unquote(val)
		case "code":
			ev.code, _ = unquote(val)
		case "ts":
			ev.ts = val
		case "id":
			ev.id, ev.hasID = parseInt(val)
		}
		return true
	})
}

// msgText returns the unquoted text of a gochat msg as the server encodes it
// ("type" first, "text" a top-level member after it), and false for any
// other line, which the caller then parses in full. Members read nothing
// else of a msg, and walking every member of every delivered line was ~40%
// of the generator's CPU at 2 M deliveries/s: the generator, not the server,
// set the pace. Inside a JSON string every quote is escaped, so the first
// `,"text":"` of a flat object can only be that member's key.
func msgText(line []byte) ([]byte, bool) {
	if !bytes.HasPrefix(line, msgPrefix) {
		return nil, false
	}
	i := bytes.Index(line, textKey)
	if i < 0 {
		return nil, false
	}
	start := i + len(textKey) - 1 // the value's opening quote
	end := endOfString(line, start)
	if end < 0 {
		return nil, false
	}
	return unquote(line[start:end])
}

var (
	msgPrefix = []byte(`{"type":"msg",`)
	textKey   = []byte(`,"text":"`)
)

var errNotObject = errors.New("not a JSON object")

// walkObject calls fn(key, value) for each top-level member of the JSON
// object in b, in order, until fn returns false. key is the raw key
// without quotes; value is the raw JSON value (strings keep their quotes).
// Nested values are skipped, not parsed.
func walkObject(b []byte, fn func(key, val []byte) bool) error {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return errNotObject
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return nil
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return errNotObject
		}
		kEnd := endOfString(b, i)
		if kEnd < 0 {
			return errNotObject
		}
		key := b[i+1 : kEnd-1]
		i = skipSpace(b, kEnd)
		if i >= len(b) || b[i] != ':' {
			return errNotObject
		}
		i = skipSpace(b, i+1)
		vEnd := endOfValue(b, i)
		if vEnd < 0 {
			return errNotObject
		}
		if !fn(key, b[i:vEnd]) {
			return nil
		}
		i = skipSpace(b, vEnd)
		if i >= len(b) {
			return errNotObject
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			return nil
		default:
			return errNotObject
		}
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n') {
		i++
	}
	return i
}

// endOfString returns the index just past the string starting at b[i]
// (which is '"'), or -1.
func endOfString(b []byte, i int) int {
	start := i + 1
	for j := start; ; {
		k := bytes.IndexByte(b[j:], '"')
		if k < 0 {
			return -1
		}
		k += j
		n := 0 // backslashes right before the quote: odd means escaped
		for p := k - 1; p >= start && b[p] == '\\'; p-- {
			n++
		}
		if n%2 == 0 {
			return k + 1
		}
		j = k + 1
	}
}

// endOfValue returns the index just past the JSON value starting at b[i],
// or -1.
func endOfValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return endOfString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = endOfString(b, i)
				if i < 0 {
					return -1
				}
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return -1
	default: // number, true, false, null
		j := i
		for j < len(b) {
			switch b[j] {
			case ',', '}', ']', ' ', '\t', '\r', '\n':
				return j
			}
			j++
		}
		return j
	}
}

// unquote returns the content of a JSON string value. Without escapes it
// is a sub-slice of val (no copy); with escapes it is decoded properly.
func unquote(val []byte) ([]byte, bool) {
	if len(val) < 2 || val[0] != '"' {
		return nil, false
	}
	inner := val[1 : len(val)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return inner, true
	}
	var s string
	if json.Unmarshal(val, &s) != nil {
		return nil, false
	}
	return []byte(s), true
}

// parseInt reads an integer JSON value (or a string holding one).
func parseInt(val []byte) (int64, bool) {
	if len(val) > 0 && val[0] == '"' {
		val, _ = unquote(val)
	}
	n, err := strconv.ParseInt(string(val), 10, 64)
	return n, err == nil
}

// errKind folds an error into a short label for the "errors" counts.
func errKind(err error) string {
	var pe protoError
	var ne net.Error
	switch {
	case errors.As(err, &pe):
		return pe.code
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.EPIPE):
		return "broken_pipe"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return "addr_not_avail"
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		return "too_many_files"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, net.ErrClosed):
		return "closed"
	}
	return fmt.Sprintf("other: %.60s", err.Error())
}

// counts is a per-goroutine error tally, merged at the end.
type counts map[string]uint64

func (c counts) add(other counts) {
	for k, v := range other {
		c[k] += v
	}
}
