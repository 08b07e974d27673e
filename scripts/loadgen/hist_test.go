package main

import "testing"

func TestBuckets(t *testing.T) {
	prev := -1
	for _, v := range []uint64{0, 1, 127, 128, 129, 255, 256, 1000, 1 << 20, 1<<40 - 1, 1 << 40, 1 << 62} {
		i := bucketOf(v)
		if i < prev || i >= nBuckets {
			t.Fatalf("bucketOf(%d) = %d (prev %d, n %d)", v, i, prev, nBuckets)
		}
		prev = i
		if v < 1<<40 {
			low, width := bucketRange(i)
			if v < low || v >= low+width || float64(width) > float64(low)/60+1 {
				t.Fatalf("value %d in bucket %d = [%d, +%d)", v, i, low, width)
			}
		}
	}
	// Buckets are contiguous.
	for i := 1; i < nBuckets-1; i++ {
		l0, w0 := bucketRange(i - 1)
		l1, _ := bucketRange(i)
		if l0+w0 != l1 {
			t.Fatalf("gap between buckets %d and %d", i-1, i)
		}
	}
}

func TestQuantiles(t *testing.T) {
	var h hist
	for us := int64(1); us <= 10000; us++ { // 1 µs .. 10 ms, uniform
		h.record(us * 1000)
	}
	var s histSum
	s.add(&h)
	for _, c := range []struct{ q, want float64 }{{0.5, 5}, {0.99, 9.9}, {1, 10}} {
		if got := s.quantileMs(c.q); got < c.want*0.98 || got > c.want*1.02 {
			t.Errorf("q%.2f = %.3f ms, want ~%.3f", c.q, got, c.want)
		}
	}
	if s.summary()["max"] != 10.0 {
		t.Errorf("max %v", s.summary()["max"])
	}
}
