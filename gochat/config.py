"""Every setting of gochat, declared once: type, default, bounds and help in one field.

Built once at start (defaults <- profile <- TOML file <- GOCHAT_* environment <- flags,
PROTOCOL.md section 9), validated before anything listens, then passed down read-only.
Tests build a :class:`Config` directly.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

ENV_PREFIX = "GOCHAT_"
MAX_PORT = 65535
MASK = "***"
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output, 256 bits.
MIN_HS256_SECRET_BYTES = 32
# Log output is scrubbed of secret values at least this long. A shorter one is left alone:
# replacing every "ab" in a log line would mangle it, and the pattern of the masks would
# spell the secret out. Where gochat prints a setting itself it masks it whatever its length.
MIN_SCRUBBED_CHARS = 8
URL_SECRET_PARAMS = ("password",)  # redis-py also reads the password from the query string


class ConfigError(ValueError):
    """A bad setting: reported before the server starts, naming the key and its source."""


def mask_whole(value: str) -> str:
    """A setting that is a secret as a whole (jwt_secret): only whether it is set shows."""
    return MASK


def _url_secrets(url: str) -> list[str]:
    """The secret parts of a URL as written: the password of the userinfo, password= parameters."""
    parts = urlsplit(url)
    found = []
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.partition(":")[2])
    found.extend(value for key, value in parse_qsl(parts.query, keep_blank_values=True)
                 if key.lower() in URL_SECRET_PARAMS)
    return [secret for secret in found if secret]


def mask_url(url: str) -> str:
    """A broker URL fit to print: redis://:pw@host and redis://user:pw@host become redis://user:***@host,
    and a password= query parameter is masked too; the rest (scheme, host, port, db) stays readable."""
    if not _url_secrets(url):
        return url
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}" if at and ":" in userinfo else parts.netloc
    pairs = [pair.partition("=") for pair in parts.query.split("&")] if parts.query else []
    query = "&".join(key + sep + (MASK if key.lower() in URL_SECRET_PARAMS else value) for key, sep, value in pairs)
    return parts._replace(netloc=netloc, query=query).geturl()


def _setting(default: Any, help: str, minimum: float | None = None, maximum: float | None = None,
             choices: tuple[str, ...] | None = None, mask: Callable[[str], str] | None = None) -> Any:
    """One field of Config. ``mask`` declares the setting secret: it gives the text to print for a value."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum,
                                            "choices": choices, "mask": mask})


@dataclass(frozen=True, slots=True)
class Setting:
    """One configuration key as the CLI, the environment and the TOML file see it."""

    key: str
    type: type
    default: Any
    help: str
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None
    mask: Callable[[str], str] | None = None

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def secret(self) -> bool:
        return self.mask is not None

    def show(self, value: Any) -> Any:
        """The value as logs, errors and `gochat config show` may print it."""
        if self.mask is None or value is None:
            return value
        return self.mask(str(value))

    def parse(self, raw: Any, source: str) -> Any:
        """Convert a raw value (a string from the environment or a flag, or a TOML value) and check it."""
        try:
            value = self._convert(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.key} = {self.show(raw)!r} (from {source}): "
                              f"expected {self.type.__name__}") from None
        if value is None:
            return None
        shown = self.show(value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.key} = {shown!r} (from {source}): expected one of {', '.join(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{self.key} = {shown!r} (from {source}): must be >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{self.key} = {shown!r} (from {source}): must be <= {self.maximum}")
        return value

    def _convert(self, raw: Any) -> Any:
        if raw is None or (raw == "" and self.default is None):
            return None
        if self.type is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(raw, bool) or isinstance(raw, (list, dict)):
            raise TypeError(raw)
        if self.type is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if self.type is float:
            value = float(raw)
            if not math.isfinite(value):  # nan passes every range check; 0, not inf, turns a feature off
                raise ValueError(raw)
            return value
        return str(raw)


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration; ``sources`` says where each value came from."""

    host: str = _setting("0.0.0.0", "address the chat port listens on")
    port: int = _setting(9000, "chat port (0 picks a free one)", 0, MAX_PORT)
    admin_host: str = _setting("127.0.0.1", "address of the admin HTTP server")
    admin_port: int = _setting(9001, "admin HTTP port (0 turns it off)", 0, MAX_PORT)
    max_connections: int = _setting(10000, "connection cap (0: only the open-file limit)", 0)
    max_conns_per_ip: int = _setting(0, "connections per client address (0: no cap)", 0)
    max_frame_bytes: int = _setting(65536, "largest frame payload or line a client may send", 64, 64 * 1024 * 1024)
    max_text_chars: int = _setting(4096, "longest msg/dm text in code points", 1)
    handshake_timeout: float = _setting(10.0, "seconds from connect until the welcome (0: never)", 0)
    heartbeat: float = _setting(30.0, "seconds of silence before the server pings (0: no pings)", 0)
    idle_timeout: float = _setting(90.0, "seconds of silence before the server closes (0: never)", 0)
    heartbeat_mode: str = _setting("fixed", "fixed, or adaptive: per-connection interval from measured RTT and jitter",
                                   choices=("fixed", "adaptive"))
    heartbeat_high_rtt: float = _setting(1.0, "adaptive: a smoothed RTT above this (s) pings half as often", 0.001)
    heartbeat_jitter: float = _setting(0.2, "adaptive: RTT jitter above this (s) pings twice as often", 0.001)
    rate: float = _setting(20.0, "requests per second per connection (token bucket refill)", 0.001)
    burst: int = _setting(40, "token bucket size", 1)
    max_strikes: int = _setting(50, "rate-limited requests in a row before the connection is closed", 1)
    max_outbound_bytes: int = _setting(1048576, "unsent bytes per connection, replies included, before "
                                                "slow_consumer", 1024)
    max_history_bytes: int = _setting(262144, "encoded bytes of messages in one history reply or join replay; "
                                              "past it the reply says more: true", 1024)
    history_size: int = _setting(1000, "messages retained per room (0: none)", 0)
    max_rooms: int = _setting(100000, "rooms kept in memory; beyond it the least recently used empty room is forgotten "
                                      "(memory broker; 0: no cap)", 0)
    max_rooms_per_session: int = _setting(100, "rooms one session may be in at once (0: no cap)", 0)
    room_ttl: float = _setting(86400.0, "seconds a room without members and without new messages is kept (0: forever)",
                               0)
    resume_window: float = _setting(120.0, "seconds a dropped session waits to be resumed (0: offline at once)", 0)
    max_sessions: int | None = _setting(None, "sessions a node holds, live and awaiting resume; past it the one "
                                              "waiting longest ends (default: twice max_connections, or twice "
                                              "the open-file limit)", 1)
    dm_rate: float = _setting(10.0, "DMs per second to one recipient, from all senders together (0: no limit)", 0)
    dm_burst: int = _setting(20, "DM burst to one recipient", 1)
    drain_timeout: float = _setting(10.0, "seconds to flush clients on shutdown", 0)
    drain_spread: float = _setting(0.0, "seconds over which shutdown closes are spread (lame duck; within drain_timeout)", 0)
    auth: str = _setting("none", "client authentication", choices=("none", "jwt"))
    jwt_secret: str | None = _setting(None, f"HS256 secret (auth = jwt), {MIN_HS256_SECRET_BYTES} bytes or more",
                                      mask=mask_whole)
    jwt_public_key: str | None = _setting(None, "RS256 public key PEM file (auth = jwt)")
    jwt_audience: str | None = _setting(None, "required aud claim (auth = jwt)")
    broker: str = _setting("memory", "memory, or redis://host:port/db for several nodes", mask=mask_url)
    presence_ttl: float = _setting(15.0, "seconds a dead node's members, nicks and sessions stay claimed (redis broker)",
                                   1, 3600)
    tls_cert: str | None = _setting(None, "PEM certificate file for TLS on the chat port")
    tls_key: str | None = _setting(None, "PEM private key file for TLS on the chat port")
    log_level: str = _setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = _setting("text", "log line format", choices=("text", "json"))
    trace_connections: bool = _setting(False, "log every connection's state changes at debug level")
    workers: int = _setting(1, "worker processes sharing the port (needs a shared broker when > 1)", 1, 256)
    profile: str = field(default="dev", metadata={"internal": True})
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        if self.auth == "jwt" and not (self.jwt_secret or self.jwt_public_key):
            raise ConfigError("auth = jwt needs jwt_secret (HS256) or jwt_public_key (RS256)")
        if self.jwt_secret and self.jwt_public_key:
            raise ConfigError("set jwt_secret or jwt_public_key, not both: HS256 and RS256 are never accepted together")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < MIN_HS256_SECRET_BYTES:
            raise ConfigError(f"jwt_secret is {len(self.jwt_secret.encode())} bytes: an HS256 secret needs at least "
                              f"{MIN_HS256_SECRET_BYTES} (256 bits, RFC 7518 section 3.2), or anyone can guess it "
                              "offline from one token; make one with `openssl rand -base64 48`")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if not (self.broker == "memory" or self.broker.startswith(("redis://", "rediss://", "unix://"))):
            raise ConfigError(f"broker = {mask_url(self.broker)!r}: expected memory or redis://host:port/db")
        if self.workers > 1 and self.broker == "memory":
            raise ConfigError("workers > 1 needs a shared broker (--broker redis://...): "
                              "with the memory broker each worker would be a separate chat service")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {s.key: getattr(self, s.key) for s in SETTINGS}

    def shown(self, key: str) -> Any:
        """A setting's value as it may be printed: secrets masked (PROTOCOL.md section 9)."""
        return BY_KEY[key].show(getattr(self, key))

    def secret_values(self) -> list[str]:
        """Every secret text in this configuration, as written and URL-decoded, for scrubbing output."""
        found: list[str] = []
        for setting in SETTINGS:
            value = getattr(self, setting.key)
            if setting.secret and value:
                parts = _url_secrets(value) if setting.mask is mask_url else [value]
                found.extend(part for raw in parts for part in {raw, unquote(raw)})
        return found

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this configuration (MIN_SCRUBBED_CHARS or longer) replaced:
        the last line of defence for log lines and error messages that quote a library's words."""
        for secret in sorted(self.secret_values(), key=len, reverse=True):
            if len(secret) >= MIN_SCRUBBED_CHARS and secret in text:
                text = text.replace(secret, MASK)
        return text


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, _TYPES[str(f.type).split(" ")[0]], f.default, f.metadata["help"],
            f.metadata["minimum"], f.metadata["maximum"], f.metadata["choices"], f.metadata["mask"])
    for f in dataclasses.fields(Config)
    if not f.metadata.get("internal")
)
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}

# Connections one address may hold in production: a NAT'd office of ~50 people on two
# devices each fits, while one attacker's address holds at most 1% of the default
# max_connections (10,000): filling a node takes 100 addresses, not one (docs/operations.md).
PROD_MAX_CONNS_PER_IP = 100

# Profiles change how gochat reports itself (section 9), with one exception: prod also caps
# connections per address, the production default issue 11 asks for. The protocol's own
# default stays 0 (no cap) for every other profile, and any layer above sets it back.
PROFILES: dict[str, dict[str, Any]] = {
    "dev": {"log_level": "debug", "log_format": "text", "trace_connections": True},
    "test": {"log_level": "warning", "log_format": "text", "trace_connections": False},
    "staging": {"log_level": "info", "log_format": "json", "trace_connections": True},
    "prod": {"log_level": "info", "log_format": "json", "trace_connections": False,
             "max_conns_per_ip": PROD_MAX_CONNS_PER_IP},
}


def load(
    profile: str = "dev",
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Layer the sources of section 9; unknown keys and bad values raise ConfigError."""
    if profile not in PROFILES:
        raise ConfigError(f"profile = {profile!r}: expected one of {', '.join(PROFILES)}")
    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    sources: dict[str, str] = {s.key: "default" for s in SETTINGS}

    def apply(raw: Mapping[str, Any], source: str) -> None:
        for key, value in raw.items():
            setting = BY_KEY.get(key)
            if setting is None:
                raise ConfigError(f"unknown key {key!r} (from {source})")
            values[key] = setting.parse(value, source)
            sources[key] = source

    apply(PROFILES[profile], f"profile {profile}")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                apply(tomllib.load(fh), f"file {config_file}")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
    env = os.environ if environ is None else environ
    apply({s.key: env[s.envvar] for s in SETTINGS if s.envvar in env}, "environment")
    apply({k: v for k, v in (flags or {}).items() if v is not None}, "flag")
    return Config(**values, profile=profile, sources=sources)
