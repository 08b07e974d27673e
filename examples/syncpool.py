"""syncpool: answer each line with its length and its upper-case form, building every
reply in a scratch buffer from a pool. Twin of examples/go/syncpool/main.go.

    python examples/syncpool.py -addr 127.0.0.1:0

Go -> gevent:
    sync.Pool{New: func() any {...}}   gochat.syncpool.Pool(bytearray)   (max_idle bounds it;
                                       no per-CPU caches and no GC clearing: one thread)
    pool.Get().(*bytes.Buffer)         pool.get()
    buf.Reset()                        del buf[:]
    pool.Put(buf)                      pool.put(buf)
Under gevent get() and put() never yield, so the pool needs no lock.

Whether to pool at all is a measurement, not a habit: CPython's allocator is fast for
small objects, and gochat pools nothing on its hot path (a read buffer held across a
blocking recv would cost more memory than it saves; see gochat/conn.py _read_loop).
Never put back a buffer that something may still read: sendall is done with it when it
returns, a buffer queued for a writer greenlet is not.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from gochat.syncpool import Pool  # noqa: E402

# A buffer that grew past this is left to the GC, so one huge line does not pin a huge
# buffer in the pool forever.
MAX_POOLED = 64 << 10

buf_pool: Pool[bytearray] = Pool(bytearray)


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="listen address (port 0: the kernel picks)")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    print("listening on %s:%d" % ln.getsockname()[:2])
    while True:
        conn, _ = ln.accept()
        gevent.spawn(handle_conn, conn)


def handle_conn(conn: socket.socket) -> None:
    with conn, conn.makefile("rb") as r:
        try:
            for line in r:
                if not line.endswith(b"\n"):
                    return
                reply(conn, line[:-1])
        except OSError:
            return


def reply(conn: socket.socket, line: bytes) -> None:
    buf = buf_pool.get()
    del buf[:]  # a pooled buffer holds whatever its last user wrote
    try:
        buf += b"%d %s\n" % (len(line), line.upper())
        conn.sendall(buf)  # sendall is done with buf when it returns: safe to put back
    finally:
        if len(buf) <= MAX_POOLED:
            buf_pool.put(buf)


if __name__ == "__main__":
    main()
