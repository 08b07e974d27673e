"""recover: serve "get N" (the N-th item of a list), with a bug: N is never checked, so
"get 7" raises. The handler catches it: the error is logged with its traceback, that
client is told "internal error" and closed, and every other client goes on.
Twin of examples/go/recover/main.go.

    python examples/recover.py -addr 127.0.0.1:0

Go -> gevent:
    defer func() { if r := recover(); r != nil {...} }()    try: ... except Exception: ...
    log.Printf("%v\\n%s", r, debug.Stack())                  log.exception(...)

The difference that matters: in Go a panic nobody recovers ends the *process*. In gevent
an exception nobody catches ends only its *greenlet*: the hub prints the traceback and
every other connection goes on. What the except adds is the rest of the job: log it
your way, answer the client, close its socket (gochat: Connection.run, which also
counts handler_exceptions). Catch Exception, never BaseException: GreenletExit (a kill)
and KeyboardInterrupt must pass through.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import BinaryIO  # noqa: E402

import gevent  # noqa: E402

log = logging.getLogger("recover")
ITEMS = ["apple", "banana", "cherry"]


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%Y/%m/%d %H:%M:%S")  # Go's log format
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="listen address (port 0: the kernel picks)")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    print("listening on %s:%d" % ln.getsockname()[:2])
    conn_id = 0
    while True:
        conn, _ = ln.accept()
        conn_id += 1
        gevent.spawn(handle_conn, conn, conn_id)


def handle_conn(conn: socket.socket, conn_id: int) -> None:
    with conn, conn.makefile("rb") as r:
        try:
            serve(conn, conn_id, r)
        except OSError:  # the connection broke: not a bug (Go: a ReadString error)
            print(f"conn {conn_id}: closed")
        except Exception:
            log.exception("conn %d: panic", conn_id)
            print(f"conn {conn_id}: recovered, closing")
            try:
                conn.sendall(b"internal error\n")
            except OSError:
                pass


def serve(conn: socket.socket, conn_id: int, r: BinaryIO) -> None:
    print(f"conn {conn_id}: open")
    for line in r:
        if not line.endswith(b"\n"):
            break
        cmd, _, arg = line.decode(errors="replace").strip().partition(" ")
        if cmd == "get":
            if not re.fullmatch(r"[+-]?[0-9]+", arg):  # strconv.Atoi's syntax; int() takes more
                conn.sendall(b"not a number\n")
                continue
            conn.sendall(item(int(arg)).encode() + b"\n")  # the bug: raises when n is out of range
        else:
            conn.sendall(b"unknown command\n")
    print(f"conn {conn_id}: closed")


def item(n: int) -> str:
    """``items[n]`` with Go's bounds: a Python list would take -1 as the last item."""
    if n < 0:
        raise IndexError(f"index out of range [{n}]")
    return ITEMS[n]


if __name__ == "__main__":
    main()
