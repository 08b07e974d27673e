package main

import (
	"bufio"
	"encoding/json"
	"math/bits"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Fanout: -senders connections publish, -members connections receive.
//
// Every message text is "s<sender> <seq> <unix-ns> xxx..." padded to
// -size bytes; seq counts from 1 per sender. Receivers take latency from
// the embedded time and track loss, duplicates and disorder per sender.
// Deliveries are counted only at the members: with gochat the senders
// have to join the room and so receive the messages too, but those copies
// are not counted.
//
// Closed loop (-window W): a sender keeps at most W messages in flight; a
// message completes on its ack (gochat) or, with raw, when the sender
// receives its own line back (the broadcaster echoes to the sender too).
// Open loop (-rate R): each sender sends R messages/s on a fixed schedule
// whatever the replies; the embedded time is the scheduled time, so a
// server that falls behind shows it in latency (no coordinated omission).

// receiver is one member connection. All fields but the atomics are owned by
// its reader goroutine and read by main only after that goroutine ends.
type receiver struct {
	c            *conn
	lat          hist
	delivered    uint64
	duplicates   uint64
	outOfOrder   uint64
	foreign      uint64 // lines/messages that are not ours
	track        []seqTrack
	errs         counts
	unique       atomic.Uint64 // polled by main while draining
	disconnected atomic.Bool   // closed by the server (set by the reader)
	synced       atomic.Bool   // raw: saw a sync line (registered with the broadcaster)
}

// seqTrack remembers which seqs of one sender a receiver has seen.
type seqTrack struct {
	seen []uint64 // bitset indexed by seq
	max  uint64
}

func (t *seqTrack) mark(seq uint64) (dup, late bool) {
	w := int(seq >> 6)
	for len(t.seen) <= w {
		t.seen = append(t.seen, 0)
	}
	bit := uint64(1) << (seq & 63)
	if t.seen[w]&bit != 0 {
		return true, false
	}
	t.seen[w] |= bit
	if seq < t.max {
		return false, true
	}
	t.max = seq
	return false, false
}

// sender is one publishing connection: its send goroutine owns sent and
// lagMax; its reader goroutine owns ackLat and errs; acked and rejected
// are polled by main while draining.
type sender struct {
	id       int
	c        *conn
	sent     uint64
	lagMax   time.Duration
	acked    atomic.Uint64
	rejected atomic.Uint64
	gone     atomic.Bool // connection closed by the server
	ackedSet seqTrack    // gochat: seqs acked (reader goroutine)
	ackLat   hist
	errs     counts        // reader goroutine
	sendErrs counts        // send goroutine
	slots    chan struct{} // window: one token per message in flight
	times    []sendTime    // gochat: send time by id, for ack latency
	synced   atomic.Bool
}

const timesRing = 1 << 16

// maxSeq bounds seqs taken from the wire before they index a bitset.
const maxSeq = 1 << 32

type sendTime struct {
	seq atomic.Uint64
	ns  atomic.Int64
}

// release frees a window slot; never blocks (a stray reply frees nothing).
func (s *sender) release() {
	select {
	case <-s.slots:
	default:
	}
}

type fanout struct {
	cfg      *config
	d        *dialer
	roomJSON []byte
	stopping atomic.Bool // set before main closes the connections
}

func runFanout(cfg *config) map[string]any {
	if cfg.members < 1 || cfg.senders < 1 {
		fatalf("fanout needs -members >= 1 and -senders >= 1")
	}
	f := &fanout{cfg: cfg, d: newDialer(cfg)}
	f.roomJSON, _ = json.Marshal(cfg.room)
	res := map[string]any{
		"members": cfg.members, "senders": cfg.senders, "size": cfg.size,
		"room": cfg.room,
	}
	if cfg.rate > 0 {
		cfg.window = 0 // open loop: no window
	} else if cfg.window < 1 {
		cfg.window = 1
	}
	res["window"] = cfg.window
	res["rate"] = cfg.rate

	// Setup: connect (and hello + join) every member, then every sender.
	// Each connection's goroutine goes on as its reader.
	setupStart := time.Now()
	setupErrs := counts{}
	var mu sync.Mutex // guards setupErrs and the slices below during setup
	var readers sync.WaitGroup
	var recvs []*receiver
	var sends []*sender
	par := make(chan struct{}, cfg.dialPar)
	var setup sync.WaitGroup
	for i := 0; i < cfg.members+cfg.senders; i++ {
		setup.Add(1)
		par <- struct{}{}
		go func(i int) {
			c, err := f.open(i)
			<-par
			mu.Lock()
			if err != nil {
				setupErrs[errKind(err)]++
				mu.Unlock()
				setup.Done()
				return
			}
			readers.Add(1)
			var run func()
			if i < cfg.members {
				r := &receiver{c: c, track: make([]seqTrack, cfg.senders), errs: counts{}}
				recvs = append(recvs, r)
				run = func() { f.receive(r) }
			} else {
				c.w = bufio.NewWriterSize(c.nc, 64<<10) // batches of messages
				s := &sender{id: i - cfg.members, c: c, errs: counts{}, sendErrs: counts{}}
				if cfg.rate <= 0 {
					s.slots = make(chan struct{}, cfg.window)
				}
				if cfg.proto == protoGochat {
					s.times = make([]sendTime, timesRing)
				}
				sends = append(sends, s)
				run = func() { f.ackLoop(s) }
			}
			mu.Unlock()
			setup.Done()
			defer readers.Done()
			run()
		}(i)
	}
	setup.Wait()
	res["members_ok"] = len(recvs)
	res["senders_ok"] = len(sends)
	res["setup_errors"] = setupErrs
	if len(recvs) == 0 || len(sends) == 0 {
		logf("setup failed: %v", setupErrs)
		f.closeAll(recvs, sends)
		readers.Wait()
		res["error"] = "setup failed"
		return res
	}
	if cfg.proto == protoRaw {
		f.syncRaw(recvs, sends)
	}
	res["setup_s"] = round3(time.Since(setupStart).Seconds())

	// Send for -duration.
	var senders sync.WaitGroup
	done := make(chan struct{})
	t0 := time.Now()
	for _, s := range sends {
		senders.Add(1)
		go func(s *sender) {
			defer senders.Done()
			if cfg.rate > 0 {
				f.sendPaced(s, t0, len(sends), done)
			} else {
				f.sendWindow(s, done)
			}
		}(s)
	}
	time.Sleep(cfg.duration)
	close(done)
	senders.Wait()
	sendDur := time.Since(t0)

	// Drain: wait until every sender has all its replies (or lost its
	// connection) and every member still connected has every expected
	// message, or -drain passes.
	var sent uint64
	for _, s := range sends {
		sent += s.sent
	}
	drainStart := time.Now()
	for time.Since(drainStart) < cfg.drain {
		complete := true
		var want uint64
		for _, s := range sends {
			acked := s.acked.Load()
			complete = complete && (acked+s.rejected.Load() >= s.sent || s.gone.Load())
			want += f.expectedOf(s, acked)
		}
		for _, r := range recvs {
			complete = complete && (r.unique.Load() >= want || r.disconnected.Load())
		}
		if complete {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	res["drain_s"] = round3(time.Since(drainStart).Seconds())
	f.closeAll(recvs, sends)
	readers.Wait()

	// Merge what each goroutine counted.
	var acked, rejected, delivered, unique, dups, ooo, foreign uint64
	var lagMax time.Duration
	disconnected := 0
	errs := counts{}
	var lat, ackLat histSum
	for _, s := range sends {
		acked += s.acked.Load()
		rejected += s.rejected.Load()
		ackLat.add(&s.ackLat)
		errs.add(s.errs)
		errs.add(s.sendErrs)
		if s.lagMax > lagMax {
			lagMax = s.lagMax
		}
	}
	for _, r := range recvs {
		delivered += r.delivered
		unique += r.unique.Load()
		dups += r.duplicates
		ooo += r.outOfOrder
		foreign += r.foreign
		lat.add(&r.lat)
		errs.add(r.errs)
		if r.disconnected.Load() {
			disconnected++
		}
	}
	// Expected: every message each member should have, by seq (see
	// expectedSet); lost: those a member never got.
	var expected, lost, lostConnected uint64
	sets := make([][]uint64, len(sends))
	for _, s := range sends {
		sets[s.id] = f.expectedSet(s)
		expected += popcount(sets[s.id]) * uint64(len(recvs))
	}
	for _, r := range recvs {
		for _, s := range sends {
			missing := countMissing(sets[s.id], r.track[s.id].seen)
			lost += missing
			// Loss where it must not happen: the server closed neither end.
			if !r.disconnected.Load() && !s.gone.Load() {
				lostConnected += missing
			}
		}
	}
	res["duration_s"] = round3(sendDur.Seconds())
	res["sent"] = sent
	res["acked"] = acked
	res["rejected"] = rejected
	res["unacked"] = sent - acked - rejected
	res["expected"] = expected
	res["delivered"] = delivered
	res["unique"] = unique
	res["lost"] = lost
	res["lost_connected"] = lostConnected
	res["duplicates"] = dups
	res["out_of_order"] = ooo
	res["foreign"] = foreign
	res["members_disconnected"] = disconnected
	res["errors"] = errs
	res["msgs_per_s"] = perSecond(sent, sendDur)
	res["deliveries_per_s"] = perSecond(delivered, sendDur)
	res["latency_ms"] = lat.summary()
	res["ack_latency_ms"] = ackLat.summary()
	if cfg.rate > 0 {
		res["max_send_lag_ms"] = round3(lagMax.Seconds() * 1000)
	}
	return res
}

// expectedSet is the set of seqs of s every member must receive, as a
// bitset. gochat: the acked ones (the ack is the server's promise; a
// rejected or never-acked message is not owed). raw: all sent, since the
// broadcaster gives no promise beyond the echo.
func (f *fanout) expectedSet(s *sender) []uint64 {
	if f.cfg.proto == protoGochat {
		return s.ackedSet.seen
	}
	set := make([]uint64, s.sent/64+1)
	for seq := uint64(1); seq <= s.sent; seq++ {
		set[seq>>6] |= 1 << (seq & 63)
	}
	return set
}

// expectedOf is how many messages of s each member should get, as far as
// is known while draining (raw: if the broadcaster dropped the sender,
// its own echoes show how much it took).
func (f *fanout) expectedOf(s *sender, acked uint64) uint64 {
	if f.cfg.proto == protoGochat || s.gone.Load() {
		return acked
	}
	return s.sent
}

func popcount(set []uint64) uint64 {
	n := 0
	for _, w := range set {
		n += bits.OnesCount64(w)
	}
	return uint64(n)
}

// countMissing counts the bits of want that are not in have.
func countMissing(want, have []uint64) uint64 {
	n := 0
	for i, w := range want {
		if i < len(have) {
			w &^= have[i]
		}
		n += bits.OnesCount64(w)
	}
	return uint64(n)
}

// open dials connection i and, for gochat, says hello and joins the room.
// Members are m<tag>-<i>, senders s<tag>-<j>.
func (f *fanout) open(i int) (*conn, error) {
	c, err := f.d.dial()
	if err != nil {
		return nil, err
	}
	if f.cfg.proto == protoGochat {
		nick := "m" + f.cfg.nickTag + "-" + strconv.Itoa(i)
		if i >= f.cfg.members {
			nick = "s" + f.cfg.nickTag + "-" + strconv.Itoa(i-f.cfg.members)
		}
		if err == nil {
			err = c.hello(nick, f.cfg.timeout)
		}
		if err == nil {
			err = c.join(f.cfg.room, f.cfg.timeout)
		}
		if err != nil {
			c.close()
			return nil, err
		}
	}
	return c, nil
}

// syncRaw waits until every raw connection is registered with the
// broadcaster: a finished dial does not mean the server's accept loop has
// run yet, and a line sent before would not reach that client. It sends
// "#sync" lines until every connection has seen one.
func (f *fanout) syncRaw(recvs []*receiver, sends []*sender) {
	deadline := time.Now().Add(f.cfg.timeout)
	for time.Now().Before(deadline) {
		sends[0].c.send([]byte("#sync\n"))
		time.Sleep(20 * time.Millisecond)
		all := true
		for _, r := range recvs {
			all = all && r.synced.Load()
		}
		for _, s := range sends {
			all = all && s.synced.Load()
		}
		if all {
			return
		}
	}
	logf("raw sync: not every connection saw the sync line after %v", f.cfg.timeout)
}

func (f *fanout) closeAll(recvs []*receiver, sends []*sender) {
	f.stopping.Store(true)
	var wg sync.WaitGroup
	closeOne := func(c *conn) {
		defer wg.Done()
		if f.cfg.proto == protoGochat && f.cfg.bye {
			c.bye()
		}
		c.close()
	}
	for _, r := range recvs {
		wg.Add(1)
		go closeOne(r.c)
	}
	for _, s := range sends {
		wg.Add(1)
		go closeOne(s.c)
	}
	wg.Wait()
}

// appendMessage appends one message (text padded to -size) for the wire.
func (f *fanout) appendMessage(b []byte, sender int, seq uint64, ns int64) []byte {
	gochat := f.cfg.proto == protoGochat
	if gochat {
		b = append(b, `{"type":"msg","room":`...)
		b = append(b, f.roomJSON...)
		b = append(b, `,"text":"`...)
	}
	start := len(b)
	b = append(b, 's')
	b = strconv.AppendInt(b, int64(sender), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, ns, 10)
	if len(b)-start < f.cfg.size {
		b = append(b, ' ')
	}
	for len(b)-start < f.cfg.size {
		b = append(b, 'x')
	}
	if gochat {
		b = append(b, `","id":`...)
		b = strconv.AppendUint(b, seq, 10)
		b = append(b, '}')
	}
	return append(b, '\n')
}

// sendWindow is the closed loop. It writes into the buffered writer while
// the window has room and flushes only when it must wait for a slot, so
// several messages in a burst cost one write.
func (f *fanout) sendWindow(s *sender, done <-chan struct{}) {
	var buf []byte
	var seq uint64
	defer f.flush(s) // what is buffered counts as sent: send it
	for {
		select {
		case <-done:
			return
		case s.slots <- struct{}{}:
		default:
			if f.flush(s) != nil {
				return
			}
			select {
			case <-done:
				return
			case s.slots <- struct{}{}:
			}
		}
		seq++
		if err := f.write(s, &buf, seq, time.Now().UnixNano()); err != nil {
			return
		}
	}
}

// sendPaced is the open loop: message n of this sender is due at
// t0 + offset + n/rate; senders are offset from each other to spread out.
func (f *fanout) sendPaced(s *sender, t0 time.Time, nSenders int, done <-chan struct{}) {
	interval := time.Duration(float64(time.Second) / f.cfg.rate)
	next := t0.Add(interval * time.Duration(s.id) / time.Duration(nSenders))
	var buf []byte
	var seq uint64
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if wait := time.Until(next); wait > 0 {
			timer.Reset(wait)
			select {
			case <-done:
				return
			case <-timer.C:
			}
		}
		select {
		case <-done:
			return
		default:
		}
		// Send everything due by now in one batch, then one flush.
		now := time.Now()
		for n := 0; !next.After(now) && n < 1000; n++ {
			if lag := now.Sub(next); lag > s.lagMax {
				s.lagMax = lag
			}
			seq++
			if err := f.write(s, &buf, seq, next.UnixNano()); err != nil {
				return
			}
			next = next.Add(interval)
		}
		if f.flush(s) != nil {
			return
		}
	}
}

func (f *fanout) flush(s *sender) error {
	s.c.mu.Lock()
	err := s.c.w.Flush()
	s.c.mu.Unlock()
	if err != nil {
		s.sendErrs[errKind(err)]++
	}
	return err
}

// write buffers message seq (flushing only if the buffer fills).
func (f *fanout) write(s *sender, buf *[]byte, seq uint64, ns int64) error {
	*buf = f.appendMessage((*buf)[:0], s.id, seq, ns)
	if s.times != nil {
		t := &s.times[seq&(timesRing-1)]
		t.ns.Store(time.Now().UnixNano())
		t.seq.Store(seq)
	}
	s.c.mu.Lock()
	_, err := s.c.w.Write(*buf)
	s.c.mu.Unlock()
	if err != nil {
		s.sendErrs[errKind(err)]++
		return err
	}
	s.sent++
	return nil
}

// receive is a member's reader loop.
func (f *fanout) receive(r *receiver) {
	gochat := f.cfg.proto == protoGochat
	var ev event
	for {
		line, err := r.c.readLine()
		if err != nil {
			if !f.stopping.Load() {
				r.disconnected.Store(true)
				r.errs["member_"+errKind(err)]++
			}
			return
		}
		text := line
		if gochat {
			t, ok := msgText(line) // the fast path: nearly every line is a msg
			if !ok {
				if ev.parse(line) != nil {
					r.errs["bad_json_from_server"]++
					continue
				}
				switch string(ev.typ) {
				case "msg":
					t = ev.text
				case "ping":
					r.c.pong(ev.ts)
					continue
				case "error":
					r.errs[string(ev.code)]++
					continue
				case "shutdown":
					r.errs["shutdown"]++
					continue
				default:
					continue
				}
			}
			text = t
		} else if len(line) > 0 && line[0] == '#' {
			r.synced.Store(true)
			continue
		}
		now := time.Now().UnixNano()
		id, seq, ns, ok := parseText(text)
		if !ok || id >= len(r.track) || seq == 0 || seq > maxSeq {
			r.foreign++
			continue
		}
		r.delivered++
		dup, late := r.track[id].mark(seq)
		if dup {
			r.duplicates++
			continue
		}
		if late {
			r.outOfOrder++
		}
		r.unique.Add(1)
		r.lat.record(now - ns)
	}
}

// ackLoop is a sender's reader loop: it completes messages on ack (gochat)
// or on the sender's own echoed line (raw), and skips everything else.
func (f *fanout) ackLoop(s *sender) {
	gochat := f.cfg.proto == protoGochat
	var ev event
	for {
		line, err := s.c.readLine()
		if err != nil {
			if !f.stopping.Load() {
				s.errs["sender_"+errKind(err)]++
				s.gone.Store(true)
			}
			return
		}
		if !gochat {
			if len(line) > 0 && line[0] == '#' {
				s.synced.Store(true)
				continue
			}
			id, _, ns, ok := parseText(line)
			if ok && id == s.id {
				s.acked.Add(1)
				s.ackLat.record(time.Now().UnixNano() - ns)
				s.release()
			}
			continue
		}
		if ev.parse(line) != nil {
			s.errs["bad_json_from_server"]++
			continue
		}
		switch string(ev.typ) {
		case "ack":
			if !ev.hasID || ev.id <= 0 || ev.id > maxSeq {
				s.errs["bad_ack_id"]++
				continue
			}
			if dup, _ := s.ackedSet.mark(uint64(ev.id)); dup {
				s.errs["duplicate_ack"]++
				continue
			}
			s.acked.Add(1)
			t := &s.times[uint64(ev.id)&(timesRing-1)]
			if t.seq.Load() == uint64(ev.id) {
				s.ackLat.record(time.Now().UnixNano() - t.ns.Load())
			}
			s.release()
		case "error":
			s.errs[string(ev.code)]++
			if ev.hasID {
				s.rejected.Add(1)
				s.release()
			}
		case "ping":
			s.c.pong(ev.ts)
		case "shutdown":
			s.errs["shutdown"]++
		}
	}
}

// parseText reads "s<sender> <seq> <ns>" at the start of a message text.
func parseText(t []byte) (sender int, seq uint64, ns int64, ok bool) {
	if len(t) < 2 || t[0] != 's' {
		return 0, 0, 0, false
	}
	i := 1
	a, i, ok := digits(t, i)
	if !ok || i >= len(t) || t[i] != ' ' {
		return 0, 0, 0, false
	}
	b, i, ok := digits(t, i+1)
	if !ok || i >= len(t) || t[i] != ' ' {
		return 0, 0, 0, false
	}
	c, i, ok := digits(t, i+1)
	if !ok || (i < len(t) && t[i] != ' ') {
		return 0, 0, 0, false
	}
	return int(a), b, int64(c), true
}

func digits(t []byte, i int) (uint64, int, bool) {
	start := i
	var n uint64
	for i < len(t) && t[i] >= '0' && t[i] <= '9' && i-start < 19 {
		n = n*10 + uint64(t[i]-'0')
		i++
	}
	return n, i, i > start
}
