package main

import (
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Idle: open -conns connections (gochat: hello + join each), print
// {"holding": N} once they are set up, hold them until -hold passes,
// stdin reaches EOF (only watched when stdin is a pipe or socket, so a
// driver can end the hold by closing it) or SIGTERM/SIGINT arrives, then
// report. While holding, each connection has a reader goroutine that
// answers heartbeat pings and discards everything else (presence), so the
// server never sees a slow consumer.
func runIdle(cfg *config) map[string]any {
	d := newDialer(cfg)
	res := map[string]any{"conns": cfg.conns, "srcs": cfg.srcs}
	if cfg.proto == protoGochat {
		res["rooms"] = cfg.rooms
	}

	var (
		mu       sync.Mutex // guards conns and setupErrs during setup
		conns    []*conn
		ok       int
		setupErr = counts{}
		stopping atomic.Bool
		dropped  atomic.Int64
		dropErr  sync.Map // kind -> *atomic.Int64
		readers  sync.WaitGroup
		setup    sync.WaitGroup
	)
	// A signal also ends the setup early (no new connections are opened).
	stopped := make(chan struct{})
	var stopOnce sync.Once
	var stopReason string
	stop := func(why string) {
		stopOnce.Do(func() { stopReason = why; close(stopped) })
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() {
		if _, ok := <-sigs; ok {
			stop("signal")
		}
	}()

	par := make(chan struct{}, cfg.dialPar)
	start := time.Now()
	attempted := 0
	for i := 0; i < cfg.conns && !isClosed(stopped); i++ {
		attempted++
		setup.Add(1)
		par <- struct{}{}
		go func(i int) {
			c, err := openIdle(cfg, d, i)
			<-par
			mu.Lock()
			if err != nil {
				setupErr[errKind(err)]++
			} else {
				conns = append(conns, c)
				ok++
				readers.Add(1)
			}
			mu.Unlock()
			setup.Done()
			if err != nil {
				return
			}
			defer readers.Done()
			if err := holdLoop(c, cfg.proto == protoGochat); err != nil && !stopping.Load() {
				dropped.Add(1)
				n, _ := dropErr.LoadOrStore(errKind(err), new(atomic.Int64))
				n.(*atomic.Int64).Add(1)
			}
		}(i)
	}
	setup.Wait()
	setupDur := time.Since(start)
	logf("idle: %d of %d connections up in %.2fs", ok, cfg.conns, setupDur.Seconds())
	emit(map[string]any{"holding": ok})

	// Hold until the first of: -hold, a signal, stdin EOF.
	holdStart := time.Now()
	timer := time.AfterFunc(cfg.hold, func() { stop("hold") })
	defer timer.Stop()
	if fi, err := os.Stdin.Stat(); err == nil && fi.Mode()&(os.ModeNamedPipe|os.ModeSocket) != 0 {
		go func() {
			buf := make([]byte, 512)
			for {
				if _, err := os.Stdin.Read(buf); err != nil {
					stop("stdin")
					return
				}
			}
		}()
	}
	<-stopped
	res["stop_reason"] = stopReason
	res["held_s"] = round3(time.Since(holdStart).Seconds())

	stopping.Store(true)
	openAtEnd := int64(ok) - dropped.Load()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func(c *conn) {
			defer wg.Done()
			if cfg.proto == protoGochat && cfg.bye {
				c.bye()
			}
			c.close()
		}(c)
	}
	wg.Wait()
	readers.Wait()

	drops := counts{}
	dropErr.Range(func(k, v any) bool {
		drops[k.(string)] = uint64(v.(*atomic.Int64).Load())
		return true
	})
	res["ok"] = ok
	res["attempted"] = attempted
	res["failed"] = attempted - ok
	res["errors"] = setupErr
	res["setup_s"] = round3(setupDur.Seconds())
	res["conns_per_s"] = perSecond(uint64(ok), setupDur)
	res["dropped"] = dropped.Load()
	res["dropped_errors"] = drops
	res["open_at_end"] = openAtEnd
	return res
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// openIdle dials connection i; gochat: hello as i<tag>-<i>, join the room
// (with -rooms K > 1: ROOM-<i mod K>).
func openIdle(cfg *config, d *dialer, i int) (*conn, error) {
	c, err := d.dial()
	if err != nil {
		return nil, err
	}
	if cfg.proto == protoGochat {
		room := cfg.room
		if cfg.rooms > 1 {
			room += "-" + strconv.Itoa(i%cfg.rooms)
		}
		err = c.hello("i"+cfg.nickTag+"-"+strconv.Itoa(i), cfg.timeout)
		if err == nil {
			err = c.join(room, cfg.timeout)
		}
		if err != nil {
			c.close()
			return nil, err
		}
	}
	return c, nil
}

// holdLoop reads until the connection ends, answering gochat pings.
func holdLoop(c *conn, gochat bool) error {
	var ev event
	for {
		line, err := c.readLine()
		if err != nil {
			return err
		}
		if !gochat {
			continue
		}
		if ev.parse(line) == nil {
			if string(ev.typ) == "ping" {
				c.pong(ev.ts)
			}
		}
	}
}
