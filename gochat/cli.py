"""The ``gochat`` command: ``serve``, ``connect``, ``config show``.

gevent's monkey-patching comes first, before anything imports ``socket`` (redis-py and
other blocking libraries only cooperate once patched).
"""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

import click  # noqa: E402
import ujson  # noqa: E402

from gochat import __version__  # noqa: E402
from gochat.config import MASK, MIN_SCRUBBED_CHARS, PROFILES, SETTINGS, Config, ConfigError, load  # noqa: E402

CLICK_TYPES = {str: click.STRING, int: click.INT, float: click.FLOAT}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (staging and prod profiles)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return ujson.dumps(entry)


class Scrubbed(logging.Formatter):
    """Another formatter's lines with the configuration's secrets masked (PROTOCOL.md section 9).

    gochat masks secrets where it prints a setting itself; this catches what it does not
    write itself (a library's exception text, a traceback), for secrets long enough to
    scrub (config.MIN_SCRUBBED_CHARS), also as JSON lines spell them (ujson writes "/" as
    "\\/"). Installed only when there is such a secret.
    """

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = sorted({form for secret in secrets for form in (secret, ujson.dumps(secret)[1:-1])},
                              key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def setup_logging(config: Config) -> None:
    # Under gevent every greenlet would otherwise get a dummy Thread object per log record;
    # no format here prints the caller, so no stack walk per record either (the logging
    # HOWTO's "Optimization"): the close line of every connection is on the connect path.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    formatter = (JsonFormatter() if config.log_format == "json"
                 else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    secrets = [secret for secret in config.secret_values() if len(secret) >= MIN_SCRUBBED_CHARS]
    handler.setFormatter(Scrubbed(formatter, secrets) if secrets else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def setting_options(command: Callable) -> Callable:
    """One flag per configuration key (section 9); None means "not given", so lower layers show through."""
    for setting in reversed(SETTINGS):
        name = "--" + setting.key.replace("_", "-")
        help_text = f"{setting.help} [default {setting.default}; env {setting.envvar}]"
        if setting.type is bool:
            option = click.option(f"{name}/--no-{name[2:]}", setting.key, default=None, help=help_text)
        else:
            kind = click.Choice(setting.choices) if setting.choices else CLICK_TYPES[setting.type]
            option = click.option(name, setting.key, type=kind, default=None, help=help_text)
        command = option(command)
    command = click.option("--profile", type=click.Choice(list(PROFILES)), default=None, envvar="GOCHAT_PROFILE",
                           help="logging and tracing defaults [dev; env GOCHAT_PROFILE]")(command)
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                           envvar="GOCHAT_CONFIG", help="TOML file with configuration keys")(command)
    return command


def build_config(config_file: str | None, profile: str | None, flags: dict[str, Any]) -> Config:
    try:
        return load(profile or "dev", config_file, flags=flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gochat")
def cli() -> None:
    """gochat: a TCP chat server on gevent, one greenlet per connection."""


@cli.command()
@setting_options
def serve(config_file: str | None, profile: str | None, **flags: Any) -> None:
    """Run the chat server until SIGTERM or SIGINT (then drain gracefully)."""
    config = build_config(config_file, profile, flags)
    setup_logging(config)
    if config.workers > 1:
        from gochat.supervisor import Supervisor

        try:
            supervisor = Supervisor(config, worker_args(sys.argv))
        except OSError as exc:
            raise click.ClickException(config.scrub(f"cannot start: {exc}")) from None
        sys.exit(supervisor.run())
    from gochat.server import Server

    try:
        server = Server(config)
    except (ConfigError, ValueError, OSError) as exc:
        raise click.ClickException(config.scrub(f"cannot start: {exc}")) from None
    sys.exit(server.serve_forever())


SUPERVISOR_FLAGS = ("--workers", "--port", "--admin-port", "--admin-host")


def worker_args(argv: list[str]) -> list[str]:
    """The serve options a worker inherits: all but those the supervisor sets for each worker."""
    args = argv[argv.index("serve") + 1:] if "serve" in argv else []
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in SUPERVISOR_FLAGS:
            skip = True
        elif not arg.startswith(tuple(flag + "=" for flag in SUPERVISOR_FLAGS)):
            kept.append(arg)
    return kept


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@setting_options
def config_show(config_file: str | None, profile: str | None, **flags: Any) -> None:
    """Print the effective configuration and where each value came from."""
    config = build_config(config_file, profile, flags)
    width = max(len(s.key) for s in SETTINGS)
    click.echo(f"{'profile':<{width}}  {config.profile}")
    for setting in SETTINGS:
        click.echo(f"{setting.key:<{width}}  {config.shown(setting.key)!s:<24} {config.sources[setting.key]}")


@cli.command()
@click.argument("address", metavar="HOST:PORT")
@click.option("--nick", required=True, help="your nick (or the token's sub with --token)")
@click.option("--room", default="lobby", show_default=True, help="room to join first")
@click.option("--token", default=None, help="JWT for servers with auth = jwt")
@click.option("--tls", is_flag=True, help="connect with TLS")
@click.option("--insecure", is_flag=True, help="with --tls: do not verify the certificate")
def connect(address: str, nick: str, room: str, token: str | None, tls: bool, insecure: bool) -> None:
    """An interactive terminal client: lines you type are sent, events print as text-mode lines.

    Commands: /join ROOM, /leave ROOM, /who [ROOM], /rooms, /msg NICK TEXT, /quit.
    """
    from gochat.terminal import run_terminal

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise click.UsageError("address must be HOST:PORT")
    sys.exit(run_terminal(host, int(port), nick, room, token, tls, insecure))


def main() -> None:
    cli(prog_name="gochat")

