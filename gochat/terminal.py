"""``gochat connect``: a person at a terminal, on top of the client library.

Incoming events print as the text-mode lines of PROTOCOL.md section 7 and typed lines take
the same /commands, so a terminal user and an ``nc`` user see one chat the same way.
"""
from __future__ import annotations

import ssl
import sys

import gevent
from gevent.fileobject import FileObjectPosix

from gochat.client import ChatError, Client, ConnectionClosed
from gochat.protocol import ProtocolError, parse_text_line, render_text

REPLIES_SHOWN = ("joined", "left", "who", "rooms", "history")


def _show(message: dict) -> None:
    line = render_text(message)
    if line is not None:
        print(line, flush=True)


def run_terminal(host: str, port: int, nick: str, room: str, token: str | None, tls: bool, insecure: bool) -> int:
    """Chat until /quit, end of input, or the server closing; the exit status."""
    context: bool | ssl.SSLContext = False
    if tls:
        context = ssl.create_default_context()
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        client = Client(host, port, tls=context)
        _show(client.hello(nick=None if token else nick, token=token))
        joined = client.join(room)
        _show(joined)
    except (OSError, ChatError) as exc:
        print(f"! {exc}", file=sys.stderr, flush=True)
        return 1
    rooms = [room]  # joined rooms, most recent last: where a plain line goes
    epochs = {room: joined.get("epoch")}  # every room joined in this run: the sequence its seqs count in
    printer = gevent.spawn(_print_incoming, client)
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    try:
        for raw in stdin:
            if client.closed:
                break
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                request = parse_text_line(line, greeted=True)
            except ProtocolError as exc:
                _show(exc.to_message())
                continue
            if request["type"] == "bye":
                client.bye()
                break
            if request.get("room", "") is None:
                if not rooms:
                    _show({"type": "error", "code": "not_in_room", "message": "join a room first: /join ROOM"})
                    continue
                request["room"] = rooms[-1]
            try:
                reply = client.request(request)
            except ChatError as exc:
                _show(exc.reply)
                continue
            if reply["type"] in REPLIES_SHOWN:
                _show(reply)
            if reply["type"] == "joined":
                rooms[:] = [r for r in rooms if r != reply["room"]] + [reply["room"]]
                if epochs.setdefault(reply["room"], reply.get("epoch")) != reply.get("epoch"):
                    epochs[reply["room"]] = reply.get("epoch")
                    print(f"* history of {reply['room']} restarted: the server forgot the room meanwhile", flush=True)
            elif reply["type"] == "left":
                rooms[:] = [r for r in rooms if r != reply["room"]]
    except ConnectionClosed:
        pass
    finally:
        client.close()
        printer.join(timeout=1)
    return 0


def _print_incoming(client: Client) -> None:
    for message in client:
        if message.get("type") == "closed":
            print("* connection lost", flush=True)
        else:
            _show(message)
    print("* disconnected", flush=True)
