"""semaphore: an echo server that serves at most -max clients at once. Twin of
examples/go/semaphore/main.go.

A client arriving when every slot is taken is told "busy" and closed at once, never left
waiting in the kernel backlog (gochat answers too_many_connections the same way).

    python examples/semaphore.py -addr 127.0.0.1:0 -max 2

Go -> gevent:
    sem := make(chan struct{}, max)    sem = BoundedSemaphore(max)
    select { case sem <- struct{}{}:   sem.acquire(blocking=False)   (True: a slot)
    default: }                         ... False: every slot taken
    <-sem                              sem.release()
A gevent.pool.Pool(max) is the same semaphore with the spawning built in: pool.full()
tells whether a slot is free, pool.spawn() takes one and gives it back when the greenlet
ends. gochat's server uses a Pool as the hard bound and checks its own cap before it.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.lock import BoundedSemaphore  # noqa: E402


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="listen address (port 0: the kernel picks)")
    parser.add_argument("-max", "--max", type=int, default=2, help="most clients served at once")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    print("listening on %s:%d" % ln.getsockname()[:2])

    # A counting semaphore: acquire takes a slot, release gives it back. Bounded: a
    # release without an acquire raises instead of silently adding a slot.
    sem = BoundedSemaphore(args.max)

    def serve(conn: socket.socket, conn_id: int) -> None:
        try:
            handle_conn(conn, conn_id)
        finally:
            sem.release()  # give the slot back, even if handle_conn raises
            print(f"conn {conn_id}: released")

    conn_id = 0
    while True:
        conn, _ = ln.accept()
        conn_id += 1
        if sem.acquire(blocking=False):  # a slot: serve in its own greenlet
            gevent.spawn(serve, conn, conn_id)
        else:  # every slot taken: refuse now (blocking=True would wait, like a Go send)
            print(f"conn {conn_id}: busy")
            with conn:
                try:
                    conn.sendall(b"busy\n")
                except OSError:  # changes nothing: it is closed anyway
                    pass


def handle_conn(conn: socket.socket, conn_id: int) -> None:
    with conn, conn.makefile("rb") as r:
        print(f"conn {conn_id}: serving")
        try:
            conn.sendall(b"welcome %d\n" % conn_id)
            for line in r:  # every line, the last one even without "\n", like ReadString
                if not line.endswith(b"\n"):
                    return  # ReadString returns the partial line with io.EOF: dropped
                conn.sendall(line)
        except OSError:
            return


if __name__ == "__main__":
    main()
