"""heartbeat: ping every client each -ping, close a client that sent nothing for -wait.
Twin of examples/go/heartbeat/main.go (the gorilla/websocket chat shape: a ticker
greenlet writes pings, the reader's timeout is renewed by every line it reads).

    python examples/heartbeat.py -addr 127.0.0.1:0 -ping 300ms -wait 450ms

Go -> gevent:
    time.NewTicker(d), ticker.C        gochat.gosync.Ticker(seconds), ticker.c
    select { case <-ticker.C: case <-done: }   gosync.select(Recv(ticker.c), Recv(done))
    sync.Mutex                         gevent.lock.Semaphore(): sendall may yield mid-line
    conn.SetReadDeadline(now + wait)   conn.settimeout(wait): a timeout per recv call, not a
                                       point in time (and it applies to sends too)
    os.ErrDeadlineExceeded             TimeoutError
    sync.WaitGroup for one goroutine   Greenlet.join()

gochat does not spend a greenlet per connection on this: one server-wide ticker checks
every connection's deadlines (gochat/server.py Server._tick, Connection.check_deadlines).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402

from gochat.gosync import Chan, Recv, Ticker, select  # noqa: E402


def duration(text: str) -> float:
    """A Go duration flag ("300ms", "1.5s") in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="listen address (port 0: the kernel picks)")
    parser.add_argument("-ping", "--ping", type=duration, default=0.3, help="time between pings")
    parser.add_argument("-wait", "--wait", type=duration, default=0.45, help="silence after which a client is closed")
    args = parser.parse_args()
    if args.ping >= args.wait:
        sys.exit("-ping must be shorter than -wait, or a live client is closed before its ping")
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    print("listening on %s:%d" % ln.getsockname()[:2])
    conn_id = 0
    while True:
        conn, _ = ln.accept()
        conn_id += 1
        gevent.spawn(handle_conn, conn, conn_id, args.ping, args.wait)


def handle_conn(conn: socket.socket, conn_id: int, ping: float, wait: float) -> None:
    print(f"conn {conn_id}: open")

    # Two greenlets write to conn: the pinger and the reader (its "timeout"). sendall can
    # yield halfway through a line when the kernel buffer is full: the lock keeps lines whole.
    lock = Semaphore()

    def write(text: str) -> None:
        with lock:
            conn.sendall(text.encode() + b"\n")

    done: Chan[None] = Chan()  # closed when the reader is finished

    def pinger() -> None:
        ticker = Ticker(ping)
        try:
            while True:
                case, _, _ = select(Recv(ticker.c), Recv(done))
                if case == 1:
                    return
                write("ping")
        except OSError:
            return
        finally:
            ticker.stop()

    pinging = gevent.spawn(pinger)
    with conn, conn.makefile("rb") as r:
        while True:
            conn.settimeout(wait)
            try:
                line = r.readline()
            except TimeoutError:
                print(f"conn {conn_id}: read deadline exceeded, closing")
                try:
                    write("timeout")
                except OSError:
                    pass
                break
            except OSError:
                break
            if not line.endswith(b"\n"):
                break
            print(f"conn {conn_id}: {line[:-1].decode(errors='replace')}")
        done.close()  # gevent could simply pinging.kill(); Go cannot kill a goroutine
        pinging.join()  # the pinger has stopped writing before the socket closes
    print(f"conn {conn_id}: closed")


if __name__ == "__main__":
    main()
