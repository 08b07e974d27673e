"""client: dial a line server, send each argument as a line (or a fixed script), print
every reply. Twin of examples/go/client/main.go.

    python examples/client.py -addr 127.0.0.1:9200 hello world

Go -> gevent:
    net.DialTimeout("tcp", addr, t)    socket.create_connection((host, port), timeout=t)
    conn.Write(b)                      conn.sendall(b)   (Go's Write also writes it all)
    conn.SetReadDeadline(now + t)      conn.settimeout(t)   (per call, not a point in time)
    bufio.NewReader(conn).ReadString   conn.makefile("rb").readline()
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

SCRIPT = ["hello", "gochat", "bye"]


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="server address")
    parser.add_argument("-timeout", "--timeout", type=float, default=5.0, help="dial and reply timeout, seconds")
    parser.add_argument("lines", nargs="*")
    args = parser.parse_args()
    lines = args.lines or SCRIPT
    host, port = args.addr.rsplit(":", 1)

    try:
        conn = socket.create_connection((host, int(port)), timeout=args.timeout)
    except OSError as exc:
        print("dial:", exc, file=sys.stderr)
        return 1
    with conn, conn.makefile("rb") as r:
        print("connected")
        for line in lines:
            print(">", line)
            try:
                conn.sendall((line + "\n").encode())
            except OSError as exc:
                print("write:", exc, file=sys.stderr)
                return 1
            try:
                reply = r.readline()  # the timeout set at dial applies to every recv
            except OSError:
                reply = b""
            if not reply.endswith(b"\n"):
                print("server closed")
                return 1
            print("<", reply[:-1].decode(errors="replace"))
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
