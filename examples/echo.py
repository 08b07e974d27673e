"""echo: every line a client sends is written back to it. Twin of examples/go/echo/main.go.

    python examples/echo.py -addr 127.0.0.1:0

Go -> gevent, line by line:
    net.Listen("tcp", addr)        socket.create_server((host, port))   (patched: gevent's socket)
    ln.Accept()                    ln.accept()          blocks this greenlet only
    go handleConn(conn, id)        gevent.spawn(handle_conn, conn, id)
    bufio.NewReader / NewWriter    conn.makefile("rb") / conn.makefile("wb")
    w.Flush()                      w.flush()
    defer conn.Close()             with conn:
gochat itself uses gevent.server.StreamServer: this same loop, plus a Pool and close-on-return.
"""
from gevent import monkey

monkey.patch_all()  # first, before anything imports socket, threading or time

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # Go's os.Stdout is unbuffered
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="listen address (port 0: the kernel picks)")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    print("listening on %s:%d" % ln.getsockname()[:2])

    # The accept loop: one greenlet per connection.
    conn_id = 0
    while True:
        conn, _ = ln.accept()
        conn_id += 1
        gevent.spawn(handle_conn, conn, conn_id)


def handle_conn(conn: socket.socket, conn_id: int) -> None:
    """Owns conn: it alone reads and writes it, and closes it."""
    print(f"conn {conn_id}: open")
    # a read buffer (one recv fills many lines) and a write buffer (flush is the send)
    with conn, conn.makefile("rb") as r, conn.makefile("wb") as w:
        try:
            while True:
                line = r.readline()
                if not line.endswith(b"\n"):  # b"": the client closed (a partial last line is dropped)
                    break
                print(f"conn {conn_id}: {line[:-1].decode(errors='replace')}")
                w.write(line)
                w.flush()
        except OSError:  # reset by the peer: Go's ReadString or Flush error
            pass
    print(f"conn {conn_id}: closed")


if __name__ == "__main__":
    main()
