"""``auth = jwt``: a hello's token names the nick (its ``sub`` claim).

The algorithm is fixed by configuration (HS256 with a secret, or RS256 with a public key),
never read from the token header, and ``exp`` and ``sub`` are required: the PyJWT
pitfalls of shared/PITFALLS.md.
"""
from __future__ import annotations

from typing import Callable

import jwt

from gochat.config import Config, ConfigError
from gochat.protocol import NICK_RE, ProtocolError


def jwt_authenticator(config: Config) -> Callable[[str], str] | None:
    """A function token -> nick raising ``auth_failed``, or None when auth is off."""
    if config.auth != "jwt":
        return None
    if config.jwt_public_key:
        try:
            with open(config.jwt_public_key, "rb") as fh:
                key: str | bytes = fh.read()
        except OSError as exc:
            raise ConfigError(f"jwt_public_key {config.jwt_public_key}: {exc.strerror}") from None
        algorithm = "RS256"
    else:
        key, algorithm = config.jwt_secret or "", "HS256"
    audience = config.jwt_audience
    options = {"require": ["exp", "sub"] + (["aud"] if audience else []), "verify_aud": bool(audience)}

    def authenticate(token: str) -> str:
        if not token:
            raise ProtocolError("auth_failed", "a token is required")
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=audience, options=options)
        except jwt.PyJWTError as exc:
            raise ProtocolError("auth_failed", f"invalid token: {exc}"[:200]) from None
        nick = claims.get("sub")
        if not isinstance(nick, str) or not NICK_RE.match(nick):
            raise ProtocolError("auth_failed", "the token's sub is not a valid nick")
        return nick

    return authenticate
