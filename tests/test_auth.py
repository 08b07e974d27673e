"""``auth = jwt``: tokens the tests sign themselves, against a real server."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gochat.client import ChatError

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def token(sub="alice", key=SECRET, algorithm="HS256", exp_in=60, **claims):
    payload = {"sub": sub, **claims}
    if exp_in is not None:
        payload["exp"] = int(time.time()) + exp_in
    return jwt.encode(payload, key, algorithm=algorithm)


def hs256_signed_with(key: bytes, claims: dict) -> str:
    """A token PyJWT refuses to make: HS256 keyed with an RSA public key."""
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    return (signing_input + b"." + b64(hmac.new(key, signing_input, hashlib.sha256).digest())).decode()


def refused(chat, port, **hello):
    client = chat(port)
    with pytest.raises(ChatError) as err:
        client.hello(**hello)
    assert err.value.code == "auth_failed"
    assert client.recv(timeout=5) is None  # auth_failed closes the connection
    return err.value.message


@pytest.fixture
def hs256(start_server):
    return start_server(auth="jwt", jwt_secret=SECRET, jwt_audience="gochat")


def test_valid_token_names_the_nick(hs256, chat):
    client = chat(hs256.port)
    assert client.hello(token=token(aud="gochat"), nick="ignored")["nick"] == "alice"


def test_bad_tokens_are_refused_and_closed(hs256, chat):
    assert "expired" in refused(chat, hs256.port, token=token(aud="gochat", exp_in=-10)).lower()
    refused(chat, hs256.port, token=token(aud="gochat", key="another-secret-another-secret-xx"))
    refused(chat, hs256.port, token=token(aud="someone-else"))
    refused(chat, hs256.port, token=token())  # no aud while one is configured
    refused(chat, hs256.port, token=token(aud="gochat", exp_in=None))  # exp is required
    refused(chat, hs256.port, token=token(sub="not a nick!", aud="gochat"))
    refused(chat, hs256.port, token="not.a.jwt")
    refused(chat, hs256.port, nick="no-token")


def test_algorithm_is_pinned_by_configuration(hs256, chat):
    unsigned = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60, "aud": "gochat"}, None, algorithm="none")
    refused(chat, hs256.port, token=unsigned)


def test_rs256_with_a_public_key_file(start_server, chat, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(public_pem)
    s = start_server(auth="jwt", jwt_public_key=str(tmp_path / "pub.pem"))
    good = token(sub="rsa-user", key=private, algorithm="RS256")
    assert chat(s.port).hello(token=good)["nick"] == "rsa-user"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(chat, s.port, token=token(sub="rsa-user", key=other, algorithm="RS256"))
    # An HS256 token "signed" with the public key must never pass (algorithm confusion).
    refused(chat, s.port, token=hs256_signed_with(public_pem, {"sub": "evil", "exp": int(time.time()) + 60}))


def test_text_mode_token_login(hs256, raw):
    t = raw(hs256.port, "text")
    t.send_raw(f"/token {token(sub='typist', aud='gochat')}\n".encode())
    assert t.read() == "* welcome typist"
    bad = raw(hs256.port, "text")
    bad.send_raw(b"typist\n")
    assert bad.read().startswith("! auth_failed")
    assert bad.closed()


def test_resume_needs_no_token(hs256, chat):
    first = chat(hs256.port)
    first.hello(token=token(sub="resumer", aud="gochat"))
    first.close()
    again = chat(hs256.port)
    assert again.hello(resume=first.session)["nick"] == "resumer"
