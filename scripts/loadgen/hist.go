package main

import "math/bits"

// Latency histogram with fixed log-linear buckets at microsecond
// resolution: exact below 128 µs, then 64 buckets per power of two (at
// most 1.6% relative error) up to 2^40 µs. Each reading goroutine owns
// one (no locks on the hot path); they are merged at the end.
const (
	subBits  = 6
	subCount = 1 << subBits // buckets per power of two
	maxShift = 40 - subBits // values are capped at 2^40 µs
	nBuckets = (maxShift+1)*subCount + subCount
)

func bucketOf(us uint64) int {
	if us >= 1<<40 {
		us = 1<<40 - 1
	}
	if us < 2*subCount {
		return int(us)
	}
	shift := bits.Len64(us) - subBits - 1
	return shift*subCount + int(us>>shift)
}

// bucketRange returns the lowest value of bucket i and its width, in µs.
func bucketRange(i int) (low, width uint64) {
	if i < 2*subCount {
		return uint64(i), 1
	}
	shift := i/subCount - 1
	return uint64(i-shift*subCount) << shift, 1 << shift
}

// hist is the per-goroutine histogram; counts are allocated on first use
// so connections that record nothing cost nothing.
type hist struct {
	counts []uint32
	n      uint64
	sumNs  float64
	maxNs  int64
}

func (h *hist) record(ns int64) {
	if ns < 0 { // clock step; count it as zero
		ns = 0
	}
	if h.counts == nil {
		h.counts = make([]uint32, nBuckets)
	}
	h.counts[bucketOf(uint64(ns)/1000)]++
	h.n++
	h.sumNs += float64(ns)
	if ns > h.maxNs {
		h.maxNs = ns
	}
}

// histSum is the merge of many hists.
type histSum struct {
	counts [nBuckets]uint64
	n      uint64
	sumNs  float64
	maxNs  int64
}

func (s *histSum) add(h *hist) {
	for i, c := range h.counts {
		s.counts[i] += uint64(c)
	}
	s.n += h.n
	s.sumNs += h.sumNs
	if h.maxNs > s.maxNs {
		s.maxNs = h.maxNs
	}
}

// quantileMs returns the q-quantile in milliseconds (bucket midpoint,
// never above the exact maximum).
func (s *histSum) quantileMs(q float64) float64 {
	if s.n == 0 {
		return 0
	}
	rank := uint64(q*float64(s.n) + 0.999999)
	if rank < 1 {
		rank = 1
	}
	var cum uint64
	for i, c := range s.counts {
		cum += c
		if cum >= rank {
			low, width := bucketRange(i)
			ms := (float64(low) + float64(width)/2) / 1000
			if max := float64(s.maxNs) / 1e6; ms > max {
				ms = max
			}
			return ms
		}
	}
	return float64(s.maxNs) / 1e6
}

// summary is the JSON form: {"count", "mean", "p50", ..., "max"} in ms.
func (s *histSum) summary() map[string]any {
	m := map[string]any{"count": s.n}
	mean := 0.0
	if s.n > 0 {
		mean = s.sumNs / float64(s.n) / 1e6
	}
	m["mean"] = round3(mean)
	for _, p := range []struct {
		name string
		q    float64
	}{{"p50", 0.50}, {"p90", 0.90}, {"p99", 0.99}, {"p999", 0.999}} {
		m[p.name] = round3(s.quantileMs(p.q))
	}
	m["max"] = round3(float64(s.maxNs) / 1e6)
	return m
}
