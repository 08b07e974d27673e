"""shutdown: an echo server that shuts down gracefully. Twin of examples/go/shutdown/main.go.

On SIGTERM or SIGINT it stops accepting, lets every handler finish the line it is working
on, tells each client "bye", waits for all handlers, and exits 0. The line "slow" takes
300 ms to answer, to show work outliving the signal.

    python examples/shutdown.py -addr 127.0.0.1:0

Go -> gevent:
    signal.NotifyContext(ctx, sigs)    with_cancel(background()) + gevent.signal_handler(sig, cancel)
                                       (never signal.signal: its handler would run between
                                       two bytecodes of whatever greenlet is running)
    <-ctx.Done(); ctx.Err()            ctx.done().recv(); ctx.err()   (gochat.gosync)
    sync.WaitGroup + go func()         gevent.pool.Group: spawn() is Add(1), a greenlet's end
                                       is Done(), join() is Wait()
    conn.(*net.TCPConn).CloseRead()    conn.shutdown(socket.SHUT_RD)
gochat's own drain (gochat/server.py Server.drain) adds what a chat needs: a "shutdown"
message with a reconnect delay, a bounded wait for output to flush, then closing.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Group  # noqa: E402

from gochat.gosync import Chan, Context, Recv, background, select, with_cancel  # noqa: E402


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("-addr", "--addr", default="127.0.0.1:9200", help="listen address (port 0: the kernel picks)")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)

    ln = socket.create_server((host, int(port)))
    print("listening on %s:%d" % ln.getsockname()[:2])

    # ctx is canceled by the first SIGTERM or SIGINT.
    ctx, stop = with_cancel(background())
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop)

    def close_on_done() -> None:
        ctx.done().recv()
        ln.close()  # stop accepting: accept raises

    gevent.spawn(close_on_done)

    handlers = Group()  # counts the running handlers
    conn_id = 0
    while True:
        try:
            conn, _ = ln.accept()
        except OSError as exc:
            if ctx.err() is not None:
                break
            print(exc, file=sys.stderr)
            gevent.sleep(0.01)
            continue
        conn_id += 1
        handlers.spawn(handle_conn, ctx, conn, conn_id)
    print("shutdown: stopped accepting")
    handlers.join()
    print("shutdown: every handler done")
    return 0


def handle_conn(ctx: Context, conn: socket.socket, conn_id: int) -> None:
    # On shutdown, wake the read below: shutdown(SHUT_RD) makes a blocked or later recv
    # return b"". The watcher ends with the handler.
    finished: Chan[None] = Chan()

    def watch() -> None:
        case, _, _ = select(Recv(ctx.done()), Recv(finished))
        if case == 0:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    watcher = gevent.spawn(watch)
    with conn, conn.makefile("rb") as r:
        try:
            while True:
                try:
                    line = r.readline()
                except OSError:  # gevent wakes a recv cut off by shutdown() with an error
                    break
                if not line.endswith(b"\n"):
                    break
                line = line[:-1]
                if line == b"slow":
                    print(f"conn {conn_id}: working")
                    gevent.sleep(0.3)
                    line = b"slow done"
                conn.sendall(line + b"\n")
            if ctx.err() is not None:
                conn.sendall(b"bye\n")
        except OSError:
            pass  # the client is gone: nothing to tell it
        finally:
            finished.close()
            watcher.join()

if __name__ == "__main__":
    sys.exit(main())
