"""TLS on the chat port, with a certificate the test makes."""
from __future__ import annotations

import datetime
import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gochat.client import Client


@pytest.fixture
def certificate(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


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
