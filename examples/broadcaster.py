"""broadcaster: the classic chat broadcaster, twin of examples/go/chat/main.go.

Every line any client sends is written to every client, the sender included. Same shape
as the Go program: one greenlet per connection reading, one per connection writing, and
one broadcaster greenlet that owns the set of clients; they talk over channels
(gochat.gosync.Chan, because gevent's queues cannot be closed or selected over).

    python examples/broadcaster.py -addr 127.0.0.1:0

Like the Go program it logs to stderr in Go's log format ("chat: listening on ADDR").
gochat does not work this way; docs/go-migration.md says why (one greenlet per
connection, output coalesced per loop turn, the hub instead of a broadcaster greenlet).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import BinaryIO, Iterator  # noqa: E402

import gevent  # noqa: E402

from gochat.gosync import Chan, Recv, Send, background, select, with_cancel  # noqa: E402

log = logging.getLogger("chat")
MAX_SCAN_TOKEN_SIZE = 64 * 1024  # bufio.MaxScanTokenSize


class Client:
    """One connection. Its ``out`` channel is its outbound queue: the broadcaster sends to
    it and only the client's writer greenlet receives."""

    __slots__ = ("conn", "out")

    def __init__(self, conn: socket.socket, queue: int) -> None:
        self.conn = conn
        self.out: Chan[bytes] = Chan(queue)


class Broadcaster:
    """Owns ``clients``: only ``run`` reads or writes the dict, so it needs no lock. Other
    greenlets ask for changes through the channels."""

    def __init__(self) -> None:
        self.register: Chan[Client] = Chan()
        self.unregister: Chan[Client] = Chan()
        self.broadcast: Chan[bytes] = Chan(64)  # a little slack so readers rarely wait
        self.clients: dict[Client, bool] = {}

    def run(self) -> None:
        """The only place that touches ``clients``, and that closes a client's ``out``."""
        while True:
            case, value, _ = select(Recv(self.register), Recv(self.unregister), Recv(self.broadcast))
            if case == 0:
                self.clients[value] = True
            elif case == 1:
                if value in self.clients:  # may already be gone (dropped as slow below)
                    self.drop(value)
            else:
                for c in list(self.clients):
                    # Never block on one client: a full queue means it is not keeping
                    # up, and waiting would stall everyone (Go: select { case ...: default: }).
                    if select(Send(c.out, value), default=True).index is None:
                        self.drop(c)

    def drop(self, c: Client) -> None:
        """Forget c and close its queue; the writer then ends and closes the socket."""
        del self.clients[c]
        c.out.close()


def scan_lines(r: BinaryIO) -> Iterator[bytes]:
    """bufio.Scanner with ScanLines: lines without "\\n" or "\\r\\n", the last one even
    without a newline; stops at EOF or at a line longer than the Scanner's buffer."""
    while True:
        line = r.readline(MAX_SCAN_TOKEN_SIZE)
        if not line or (len(line) == MAX_SCAN_TOKEN_SIZE and not line.endswith(b"\n")):
            return  # EOF, or bufio.ErrTooLong
        line = line.removesuffix(b"\n")
        yield line.removesuffix(b"\r")


def handle_conn(b: Broadcaster, conn: socket.socket, queue: int) -> None:
    """The reader, in the connection's own greenlet: a blocked read costs only the greenlet."""
    c = Client(conn, queue)
    b.register.send(c)
    writer = gevent.spawn(write_loop, c)
    try:
        with conn.makefile("rb") as r:
            for line in scan_lines(r):
                b.broadcast.send(line + b"\n")  # a fresh bytes object: safe to share
    except OSError:
        pass  # EOF, error, or the writer shut the socket down
    b.unregister.send(c)
    writer.join()  # the owner waits for what it spawned (Go leaves this to the writer)


def write_loop(c: Client) -> None:
    """The only code that writes to the socket. It coalesces: lines go into a buffered
    writer, flushed (one syscall) only when the queue is empty."""
    try:
        with c.conn.makefile("wb") as w:
            for line in c.out:  # for line := range c.out: ends when the broadcaster closes it
                w.write(line)
                if not len(c.out):
                    w.flush()
    except OSError:
        pass
    finally:
        # defer c.conn.Close(). In Go, Close wakes the reader blocked in Read; in gevent a
        # socket with a makefile() open is only really closed when that file is, so
        # shutdown() is what wakes the reader here.
        try:
            c.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        c.conn.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y/%m/%d %H:%M:%S")
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9100", help="listen address")
    parser.add_argument("-queue", "--queue", type=int, default=256,
                        help="per-client outbound queue, in lines; a client whose queue is full is dropped")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    log.info("chat: listening on %s:%d", *ln.getsockname()[:2])

    # signal.NotifyContext: on SIGINT/SIGTERM, closing the listener makes accept fail,
    # which ends the accept loop below.
    ctx, stop = with_cancel(background())
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop)

    def close_on_done() -> None:
        ctx.done().recv()
        ln.close()

    gevent.spawn(close_on_done)

    b = Broadcaster()
    gevent.spawn(b.run)

    while True:
        try:
            conn, _ = ln.accept()
        except OSError as exc:
            if ctx.err() is not None:
                log.info("chat: shutting down")
                return 0  # open connections die with the process
            # Out of file descriptors and the like: log, back off a little so the loop
            # does not spin, and keep accepting.
            log.info("%s", exc)
            gevent.sleep(0.01)
            continue
        # Go sets TCP_NODELAY on every TCP connection; Python does not.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gevent.spawn(handle_conn, b, conn, args.queue)


if __name__ == "__main__":
    sys.exit(main())
