package main

import (
	"bufio"
	"strings"
	"testing"
)

func TestEventParse(t *testing.T) {
	cases := []struct {
		line, typ, text, code string
		id                    int64
		hasID                 bool
	}{
		{`{"type":"msg","room":"r","from":"a","text":"s1 2 3 xx","seq":4,"ts":5,"id":2}`, "msg", "s1 2 3 xx", "", 2, true},
		// Python's default separators, nesting and escapes before the fields we want.
		{`{"type": "msg", "meta": {"a": [1, "}\"]"], "b": {}}, "text": "s0 1 9", "id": 7}`, "msg", "s0 1 9", "", 7, true},
		{`{"text":"a\"b\\","type":"msg"}`, "msg", `a"b\`, "", 0, false},
		{`{"type":"ack","id":"12","seq":1}`, "ack", "", "", 12, true},
		{`{"type":"error","code":"rate_limited","message":"x","id":3}`, "error", "", "rate_limited", 3, true},
		// presence: parsing stops after type, the rest is never looked at.
		{`{"type":"presence","nick":"x","text":"nope"}`, "presence", "", "", 0, false},
		{` {} `, "", "", "", 0, false},
	}
	for _, c := range cases {
		var ev event
		if err := ev.parse([]byte(c.line)); err != nil {
			t.Fatalf("%s: %v", c.line, err)
		}
		if string(ev.typ) != c.typ || string(ev.text) != c.text || string(ev.code) != c.code || ev.id != c.id || ev.hasID != c.hasID {
			t.Errorf("%s: got type=%q text=%q code=%q id=%d/%v", c.line, ev.typ, ev.text, ev.code, ev.id, ev.hasID)
		}
	}
	for _, bad := range []string{``, `[]`, `{"type"}`, `{"type":"msg"`, `{"a":1 "b":2}`, `{"a":"x}`} {
		var ev event
		if ev.parse([]byte(bad)) == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestParseText(t *testing.T) {
	var f fanout
	f.cfg = &config{proto: protoRaw, size: 40}
	b := f.appendMessage(nil, 3, 1234, 1700000000000000000)
	if len(b) != 41 || b[40] != '\n' {
		t.Fatalf("bad message %q", b)
	}
	id, seq, ns, ok := parseText(b[:40])
	if !ok || id != 3 || seq != 1234 || ns != 1700000000000000000 {
		t.Fatalf("got %d %d %d %v", id, seq, ns, ok)
	}
	for _, bad := range []string{"", "s", "s1", "s1 2", "x1 2 3", "s1 2 3x", "#sync"} {
		if _, _, _, ok := parseText([]byte(bad)); ok {
			t.Errorf("%q parsed", bad)
		}
	}
	f.cfg = &config{proto: protoGochat, size: 10}
	f.roomJSON = []byte(`"lobby"`)
	var ev event
	if err := ev.parse(f.appendMessage(nil, 1, 2, 3)); err != nil || string(ev.text) != "s1 2 3 xxx" || ev.id != 2 {
		t.Fatalf("gochat message: %v %q %d", err, ev.text, ev.id)
	}
}

func TestReadLineLong(t *testing.T) {
	long := strings.Repeat("y", 100)
	c := &conn{r: bufio.NewReaderSize(strings.NewReader("a\r\n"+long+"\nb\npartial"), 16)}
	for _, want := range []string{"a", long, "b"} {
		got, err := c.readLine()
		if err != nil || string(got) != want {
			t.Fatalf("got %q %v, want %q", got, err, want)
		}
	}
	if _, err := c.readLine(); err == nil {
		t.Fatal("partial line at EOF returned")
	}
}

func TestSeqTrack(t *testing.T) {
	var tr seqTrack
	type r struct{ dup, late bool }
	for i, c := range []struct {
		seq  uint64
		want r
	}{{1, r{}}, {3, r{}}, {2, r{false, true}}, {3, r{true, false}}, {200, r{}}, {1, r{true, false}}} {
		dup, late := tr.mark(c.seq)
		if (r{dup, late}) != c.want {
			t.Errorf("step %d seq %d: got %v want %v", i, c.seq, r{dup, late}, c.want)
		}
	}
}

func TestMsgText(t *testing.T) {
	cases := []struct {
		line, text string
		ok         bool
	}{
		{`{"type":"msg","room":"r","from":"s1","text":"s1 2 3 xxx","seq":7,"ts":1,"id":2}`, "s1 2 3 xxx", true},
		{`{"type":"msg","room":"r","from":"a\",\"text\":\"no","text":"yes","seq":1}`, "yes", true},
		{`{"type":"msg","room":"r","text":"tab\there","seq":1}`, "tab\there", true},
		{`{"type":"ack","id":2,"seq":7}`, "", false},
		{`{"type":"presence","room":"r","nick":"n","status":"online"}`, "", false},
		{`{"room":"r","type":"msg","text":"key order differs"}`, "", false},
		{`{"type":"msg","room":"r","text":"unterminated`, "", false},
	}
	for _, c := range cases {
		got, ok := msgText([]byte(c.line))
		if ok != c.ok || (ok && string(got) != c.text) {
			t.Errorf("%s: got %q %v", c.line, got, ok)
		}
		if !c.ok {
			continue
		}
		var ev event // the full parse agrees
		if err := ev.parse([]byte(c.line)); err != nil || string(ev.text) != c.text {
			t.Errorf("%s: full parse %q %v", c.line, ev.text, err)
		}
	}
}
