// Command loadgen drives a chat server over TCP and prints one JSON object
// with the results on stdout (progress and diagnostics go to stderr).
//
// It speaks two protocols: "raw" (newline-terminated lines, every line is
// broadcast to every client: the Go reference in examples/go/chat) and
// "gochat" (JSON lines, see docs/protocol.md). Modes:
//
//	fanout   senders publish into one room, members receive; loss, order, latency
//	idle     hold many connections open (for memory measurements)
//	connect  connection churn: connect, handshake, close
//
// See README.md for flags and output fields. Only the standard library is used.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// seconds is a duration flag that takes either a Go duration ("3s",
// "500ms") or a plain number of seconds ("3", "0.5"), so driver scripts
// can pass floats.
type seconds struct{ d time.Duration }

func (s *seconds) String() string { return s.d.String() }

func (s *seconds) Set(v string) error {
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		s.d = time.Duration(f * float64(time.Second))
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("want seconds or a Go duration: %q", v)
	}
	s.d = d
	return nil
}

type config struct {
	mode       string
	cpuProfile string
	addr       string
	proto      string
	room       string
	nickTag    string
	srcs       int
	timeout    time.Duration
	dialPar    int
	readBuf    int

	// fanout
	members  int
	senders  int
	size     int
	window   int
	rate     float64
	duration time.Duration
	drain    time.Duration

	// idle
	conns int
	rooms int
	hold  time.Duration

	// connect
	concurrency int
	bye         bool
	byeWait     bool
}

const (
	protoRaw    = "raw"
	protoGochat = "gochat"
)

func parseFlags() *config {
	c := &config{}
	duration := seconds{10 * time.Second}
	drain := seconds{3 * time.Second}
	hold := seconds{30 * time.Second}
	timeout := seconds{10 * time.Second}
	flag.StringVar(&c.mode, "mode", "fanout", "fanout | idle | connect")
	flag.StringVar(&c.addr, "addr", "127.0.0.1:9100", "server host:port")
	flag.StringVar(&c.proto, "proto", protoRaw, "raw (newline lines, broadcast to all) | gochat (JSON lines)")
	flag.StringVar(&c.room, "room", "load", "gochat room")
	flag.StringVar(&c.nickTag, "nick-tag", "", "gochat nick infix making nicks unique per run (default: random)")
	flag.IntVar(&c.srcs, "srcs", 1, "spread connections over source addresses 127.0.0.1..127.0.0.K")
	flag.Var(&timeout, "timeout", "dial and handshake timeout")
	flag.IntVar(&c.dialPar, "dial-concurrency", 64, "connections being set up at once")
	flag.IntVar(&c.readBuf, "read-buffer", 0, "bufio.Reader size per connection (default 64 KiB fanout, 1 KiB idle, 4 KiB connect); longer lines still work")

	flag.IntVar(&c.members, "members", 100, "fanout: receiving connections")
	flag.IntVar(&c.senders, "senders", 4, "fanout: sending connections (extra, not counted as receivers)")
	flag.IntVar(&c.size, "size", 100, "fanout: message text bytes")
	flag.IntVar(&c.window, "window", 4, "fanout: max un-acked messages per sender (closed loop; ignored with -rate)")
	flag.Float64Var(&c.rate, "rate", 0, "fanout: messages/s per sender, paced open loop (0: use -window)")
	flag.Var(&duration, "duration", "fanout, connect: how long to send / churn")
	flag.Var(&drain, "drain", "fanout: max wait for outstanding deliveries after sending stops")

	flag.IntVar(&c.conns, "conns", 1000, "idle: connections to open")
	flag.IntVar(&c.rooms, "rooms", 1, "idle, gochat: spread connections over this many rooms (ROOM-0..); 1 means -room itself")
	flag.Var(&hold, "hold", "idle: how long to hold the connections (stdin EOF or SIGTERM ends it sooner)")

	flag.IntVar(&c.concurrency, "concurrency", 8, "connect: workers")
	flag.BoolVar(&c.bye, "bye", true, "gochat: send bye before closing (frees the session at once instead of after resume_window)")
	flag.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of the generator here (go tool pprof)")
	flag.BoolVar(&c.byeWait, "bye-wait", false, "connect, gochat: after bye, read until the server closes (the server then closes first)")
	flag.Parse()

	c.duration, c.drain, c.hold, c.timeout = duration.d, drain.d, hold.d, timeout.d
	if c.nickTag == "" {
		c.nickTag = strconv.FormatUint(uint64(rand.New(rand.NewSource(time.Now().UnixNano())).Int63())&0xffffff, 36)
	}
	if c.readBuf == 0 {
		switch c.mode {
		case "fanout":
			c.readBuf = 64 << 10 // few connections, many messages
		case "idle":
			c.readBuf = 1 << 10 // many connections, few messages
		default:
			c.readBuf = 4 << 10
		}
	}
	if c.srcs < 1 || c.srcs > 254 {
		fatalf("-srcs must be 1..254")
	}
	if c.proto != protoRaw && c.proto != protoGochat {
		fatalf("-proto must be raw or gochat")
	}
	if c.dialPar < 1 {
		c.dialPar = 1
	}
	if c.rooms < 1 {
		c.rooms = 1
	}
	return c
}

func main() {
	cfg := parseFlags()
	raiseFileLimit()
	if cfg.cpuProfile != "" {
		f, err := os.Create(cfg.cpuProfile)
		if err != nil {
			fatalf("cpuprofile: %v", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatalf("cpuprofile: %v", err)
		}
	}
	start := time.Now()

	var res map[string]any
	switch cfg.mode {
	case "fanout":
		res = runFanout(cfg)
	case "idle":
		res = runIdle(cfg)
	case "connect":
		res = runConnect(cfg)
	default:
		fatalf("unknown -mode %q", cfg.mode)
	}
	if cfg.cpuProfile != "" {
		pprof.StopCPUProfile()
	}
	res["mode"] = cfg.mode
	res["proto"] = cfg.proto
	res["addr"] = cfg.addr
	addUsage(res, start)
	emit(res)
	if _, failed := res["error"]; failed {
		os.Exit(1)
	}
}

// raiseFileLimit lifts the soft RLIMIT_NOFILE to the hard limit: every
// connection is a file descriptor.
func raiseFileLimit() {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			logf("setrlimit: %v", err)
		}
	}
}

// addUsage records this process's own CPU time, to show whether the
// generator itself was close to being the bottleneck.
func addUsage(res map[string]any, start time.Time) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		user := time.Duration(ru.Utime.Nano()).Seconds()
		sys := time.Duration(ru.Stime.Nano()).Seconds()
		res["cpu_user_s"] = round3(user)
		res["cpu_sys_s"] = round3(sys)
		res["cpu_s"] = round3(user + sys)
		res["max_rss_kb"] = ru.Maxrss
	}
	res["wall_s"] = round3(time.Since(start).Seconds())
}

// emit writes one JSON object on one line; os.Stdout is unbuffered.
func emit(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fatalf("json: %v", err)
	}
	os.Stdout.Write(append(b, '\n'))
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+strings.TrimSuffix(format, "\n")+"\n", a...)
}

func fatalf(format string, a ...any) {
	logf(format, a...)
	os.Exit(2)
}

func round3(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) { // no JSON form
		return 0
	}
	return math.Round(f*1000) / 1000
}

func perSecond(n uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return round3(float64(n) / d.Seconds())
}
