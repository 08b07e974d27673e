"""TLS on the chat port, with a certificate the test makes."""
from __future__ import annotations

import ssl

import pytest

from gochat.client import Client


def test_tls_chat_with_the_client_library(start_server, certificate):
    cert, key = certificate
    s = start_server(tls_cert=cert, tls_key=key, rate=1000, burst=1000)
    context = ssl.create_default_context(cafile=cert)
    a, b = Client("127.0.0.1", s.port, tls=context), Client("127.0.0.1", s.port, tls=context, codec="frames")
    try:
        a.hello(nick="tls-a")
        b.hello(nick="tls-b")
        a.join("secure")
        b.join("secure")
        for k in range(100):  # 400 KB: many TLS records, more than one socket buffer
            a.send_nowait({"type": "msg", "room": "secure", "text": f"{k} over tls " + "x" * 4000})
        assert [b.expect("msg", room="secure")["text"].split()[0] for _ in range(100)] == [str(k) for k in range(100)]
    finally:
        a.close()
        b.close()


def test_plain_client_on_a_tls_port_gets_nothing_in_clear(start_server, certificate, raw):
    cert, key = certificate
    s = start_server(tls_cert=cert, tls_key=key, handshake_timeout=1)
    c = raw(s.port)
    c.send({"type": "hello", "nick": "plain"})
    assert c.closed(timeout=5)
    assert b"welcome" not in c.buf


def test_untrusted_certificate_is_refused_by_the_client(start_server, certificate):
    cert, key = certificate
    s = start_server(tls_cert=cert, tls_key=key)
    with pytest.raises(ssl.SSLError):
        Client("127.0.0.1", s.port, tls=True)  # system CAs do not know the test's certificate
