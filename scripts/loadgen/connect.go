package main

import (
	"strconv"
	"sync"
	"time"
)

// Connect: -concurrency workers loop for -duration. One iteration:
//
//	gochat: connect, hello with a unique nick (c<tag>-<worker>-<n>), wait
//	        for welcome; then (with -bye, the default) send bye, so no
//	        session lingers for resume, and close: the client closes first,
//	        as the raw client does. With -bye-wait it reads until the
//	        server has closed instead, which leaves the server the active
//	        close (its side of the connection then sits in TIME_WAIT).
//	raw:    connect, write one line, read until that line comes back (the
//	        broadcaster echoes to the sender), close.
//
// Latency is from the start of the dial to the welcome (gochat) or the
// echo (raw); closing is not included. Errors are counted by kind and the
// worker goes on with the next iteration.
func runConnect(cfg *config) map[string]any {
	d := newDialer(cfg)
	type worker struct {
		lat  hist
		ok   uint64
		errs counts
	}
	workers := make([]*worker, cfg.concurrency)
	deadline := time.Now().Add(cfg.duration)
	start := time.Now()
	var wg sync.WaitGroup
	for w := range workers {
		wk := &worker{errs: counts{}}
		workers[w] = wk
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for n := 0; time.Now().Before(deadline); n++ {
				t0 := time.Now()
				err := connectOnce(cfg, d, w, n, func() { wk.lat.record(time.Since(t0).Nanoseconds()) })
				if err != nil {
					wk.errs[errKind(err)]++
					continue
				}
				wk.ok++
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start)

	var ok, failed uint64
	errs := counts{}
	var lat histSum
	for _, wk := range workers {
		ok += wk.ok
		for _, v := range wk.errs {
			failed += v
		}
		errs.add(wk.errs)
		lat.add(&wk.lat)
	}
	return map[string]any{
		"concurrency":    cfg.concurrency,
		"duration_s":     round3(elapsed.Seconds()),
		"connects":       ok,
		"failed":         failed,
		"errors":         errs,
		"connects_per_s": perSecond(ok, elapsed),
		"latency_ms":     lat.summary(),
	}
}

// connectOnce runs one iteration; done is called when the handshake
// completes (that is what latency measures).
func connectOnce(cfg *config, d *dialer, w, n int, done func()) error {
	c, err := d.dial()
	if err != nil {
		return err
	}
	defer c.close()
	c.nc.SetDeadline(time.Now().Add(cfg.timeout))
	if cfg.proto == protoGochat {
		if err := c.hello("c"+cfg.nickTag+"-"+strconv.Itoa(w)+"-"+strconv.Itoa(n), cfg.timeout); err != nil {
			return err
		}
		done()
		if cfg.bye {
			c.nc.SetDeadline(time.Now().Add(cfg.timeout))
			if err := c.send([]byte(`{"type":"bye"}` + "\n")); err != nil {
				return err
			}
			if !cfg.byeWait {
				return nil
			}
			// Read to EOF: the server flushes what it owes, then closes.
			for {
				if _, err := c.readLine(); err != nil {
					return nil
				}
			}
		}
		return nil
	}
	line := "c" + strconv.Itoa(w) + " " + strconv.Itoa(n)
	if err := c.send([]byte(line + "\n")); err != nil {
		return err
	}
	for {
		got, err := c.readLine()
		if err != nil {
			return err
		}
		if string(got) == line {
			done()
			return nil
		}
	}
}
