"""Config: every key declared once, layered defaults <- profile <- file <- environment <- flags (section 9).

Every test passes ``environ`` explicitly, so the developer's own GOCHAT_* variables never leak in.
"""
import dataclasses

import pytest

from gochat.config import BY_KEY, PROD_MAX_CONNS_PER_IP, PROFILES, SETTINGS, Config, ConfigError, load, mask_url

# PROTOCOL.md section 9, the same for every profile.
SECTION_9_DEFAULTS = {
    "host": "0.0.0.0",
    "port": 9000,
    "admin_host": "127.0.0.1",
    "admin_port": 9001,
    "max_connections": 10000,
    "max_conns_per_ip": 0,
    "max_frame_bytes": 65536,
    "max_text_chars": 4096,
    "handshake_timeout": 10,
    "heartbeat": 30,
    "idle_timeout": 90,
    "rate": 20,
    "burst": 40,
    "max_strikes": 50,
    "max_outbound_bytes": 1048576,
    "history_size": 1000,
    "resume_window": 120,
    "drain_timeout": 10,
    "auth": "none",
    "jwt_secret": None,
    "jwt_public_key": None,
    "jwt_audience": None,
    "broker": "memory",
    "tls_cert": None,
    "tls_key": None,
}
REPORTING_KEYS = {"log_level", "log_format", "trace_connections"}
# The one limit a profile sets: prod caps connections per address (issue 11; docs/operations.md).
PROFILE_LIMITS = {"prod": {"max_conns_per_ip": PROD_MAX_CONNS_PER_IP}}
SECRET = "s3cret-for-config-tests-0123456789"  # an HS256 secret must be 32 bytes or more


def write_toml(tmp_path, text):
    path = tmp_path / "gochat.toml"
    path.write_text(text)
    return str(path)


def config_error(**load_args):
    with pytest.raises(ConfigError) as info:
        load(**{"environ": {}, **load_args})
    return str(info.value)


# ---------------------------------------------------------------- declarations


def test_defaults_match_section_9():
    config = Config()
    for key, value in SECTION_9_DEFAULTS.items():
        assert getattr(config, key) == value, key
    assert (config.log_level, config.log_format) == ("info", "text")


def test_every_setting_is_declared_with_help_and_a_matching_type():
    assert {s.key for s in SETTINGS} >= set(SECTION_9_DEFAULTS) | REPORTING_KEYS
    assert "profile" not in BY_KEY and "sources" not in BY_KEY
    for setting in SETTINGS:
        assert setting.help, setting.key
        assert setting.envvar == "GOCHAT_" + setting.key.upper()
        assert setting.default is None or type(setting.default) is setting.type, setting.key


def test_durations_are_floats_and_counts_are_ints():
    for key in ("handshake_timeout", "heartbeat", "idle_timeout", "rate", "resume_window", "drain_timeout"):
        assert BY_KEY[key].type is float
    for key in ("port", "max_frame_bytes", "burst", "max_strikes", "history_size", "max_connections"):
        assert BY_KEY[key].type is int


def test_config_is_frozen_and_replace_builds_a_new_one():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1
    other = config.replace(port=1234)
    assert (config.port, other.port) == (9000, 1234)


def test_as_dict_lists_every_setting_and_nothing_internal():
    assert list(Config().as_dict()) == [s.key for s in SETTINGS]


# ---------------------------------------------------------------- layering and sources


def test_load_without_sources_gives_defaults_and_the_dev_profile():
    config = load(environ={})
    for key, value in SECTION_9_DEFAULTS.items():
        assert getattr(config, key) == value
        assert config.sources[key] == "default"
    assert config.profile == "dev"
    assert config.log_level == PROFILES["dev"]["log_level"]
    assert config.sources["log_level"] == "profile dev"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_change_reporting_and_only_prod_caps_connections_per_address(profile):
    config = load(profile=profile, environ={})
    limits = PROFILE_LIMITS.get(profile, {})
    assert set(PROFILES[profile]) <= REPORTING_KEYS | set(limits)
    for key, value in PROFILES[profile].items():
        assert getattr(config, key) == value
    for key, value in {**SECTION_9_DEFAULTS, **limits}.items():
        assert getattr(config, key) == value


def test_the_prod_per_address_cap_can_be_set_back():
    assert load(profile="prod", environ={"GOCHAT_MAX_CONNS_PER_IP": "0"}).max_conns_per_ip == 0
    assert load(profile="prod", environ={}).sources["max_conns_per_ip"] == "profile prod"


def test_unknown_profile():
    assert "profile" in config_error(profile="qa")


def test_each_layer_overrides_the_one_below(tmp_path):
    path = write_toml(tmp_path, "port = 1001\nburst = 5\nrate = 2.5\nlog_level = 'error'\n")
    config = load(profile="prod", config_file=path,
                  environ={"GOCHAT_BURST": "6", "GOCHAT_RATE": "3.5", "GOCHAT_UNRELATED": "x"},
                  flags={"rate": 4.5})
    assert (config.port, config.sources["port"]) == (1001, f"file {path}")
    assert (config.burst, config.sources["burst"]) == (6, "environment")
    assert (config.rate, config.sources["rate"]) == (4.5, "flag")
    assert (config.log_level, config.sources["log_level"]) == ("error", f"file {path}")
    assert (config.log_format, config.sources["log_format"]) == ("json", "profile prod")
    assert (config.host, config.sources["host"]) == ("0.0.0.0", "default")


def test_flags_left_unset_show_the_lower_layers_through():
    """click passes None for every flag the user did not give."""
    config = load(environ={"GOCHAT_PORT": "7000"}, flags={"port": None, "heartbeat": None, "burst": 3})
    assert (config.port, config.sources["port"]) == (7000, "environment")
    assert (config.heartbeat, config.sources["heartbeat"]) == (30.0, "default")
    assert config.burst == 3


def test_environment_strings_are_converted_to_each_type():
    config = load(environ={
        "GOCHAT_MAX_FRAME_BYTES": "1024",
        "GOCHAT_HEARTBEAT": "0.5",
        "GOCHAT_IDLE_TIMEOUT": "2",
        "GOCHAT_TRACE_CONNECTIONS": "no",
        "GOCHAT_HOST": "127.0.0.1",
    })
    assert config.max_frame_bytes == 1024 and type(config.max_frame_bytes) is int
    assert config.heartbeat == 0.5
    assert config.idle_timeout == 2.0 and type(config.idle_timeout) is float
    assert config.trace_connections is False
    assert config.host == "127.0.0.1"


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("YES", True), ("on", True),
                                        ("0", False), ("false", False), ("No", False), ("off", False)])
def test_bool_spellings(raw, value):
    assert load(environ={"GOCHAT_TRACE_CONNECTIONS": raw}).trace_connections is value


def test_empty_environment_value_unsets_an_optional_key():
    config = load(environ={"GOCHAT_JWT_AUDIENCE": ""})
    assert config.jwt_audience is None
    assert config.sources["jwt_audience"] == "environment"


def test_zero_turns_features_off_and_is_accepted():
    keys = ("heartbeat", "idle_timeout", "resume_window", "history_size", "max_connections",
            "max_conns_per_ip", "admin_port", "handshake_timeout", "drain_timeout", "port")
    config = load(environ={BY_KEY[k].envvar: "0" for k in keys})
    for key in keys:
        assert getattr(config, key) == 0, key


def test_toml_file_values_keep_their_types(tmp_path):
    path = write_toml(tmp_path, f'heartbeat = 2\nrate = 100\nauth = "jwt"\njwt_secret = "{SECRET}"\n'
                                "trace_connections = true\nmax_frame_bytes = 4096\n")
    config = load(config_file=path, environ={})
    assert config.heartbeat == 2.0 and type(config.heartbeat) is float
    assert config.rate == 100.0
    assert (config.auth, config.jwt_secret) == ("jwt", SECRET)
    assert config.trace_connections is True
    assert config.max_frame_bytes == 4096


def test_setting_parse_directly():
    assert BY_KEY["port"].parse("80", "flag") == 80
    assert BY_KEY["rate"].parse(3, "file x") == 3.0
    assert BY_KEY["jwt_secret"].parse("", "environment") is None


# ---------------------------------------------------------------- rejected values


def test_unknown_key_in_the_file_names_key_and_source(tmp_path):
    path = write_toml(tmp_path, "port = 1\nmax_frame_byte = 10\n")
    message = config_error(config_file=path)
    assert "max_frame_byte" in message and path in message


def test_nested_table_in_the_file_is_an_unknown_key(tmp_path):
    path = write_toml(tmp_path, "[server]\nport = 1\n")
    assert "server" in config_error(config_file=path)


def test_unknown_flag():
    assert "nope" in config_error(flags={"nope": 1})


def test_missing_config_file(tmp_path):
    assert "cannot read" in config_error(config_file=str(tmp_path / "absent.toml"))


def test_invalid_toml(tmp_path):
    path = write_toml(tmp_path, "port = = 3\n")
    assert path in config_error(config_file=path)


@pytest.mark.parametrize("key, raw", [
    ("port", "abc"),
    ("port", "80.5"),
    ("port", ""),
    ("max_frame_bytes", "1e6"),
    ("rate", "fast"),
    ("heartbeat", "soon"),
    ("trace_connections", "maybe"),
])
def test_wrong_type_from_the_environment(key, raw):
    message = config_error(environ={BY_KEY[key].envvar: raw})
    assert key in message and "environment" in message


@pytest.mark.parametrize("line", [
    'port = "abc"',
    "port = true",
    "port = 1.5",
    "port = [9000]",
    "port = {a = 1}",
    'rate = "fast"',
    "rate = false",
    "trace_connections = 2",
    "heartbeat = [1]",
])
def test_wrong_type_from_the_file(tmp_path, line):
    path = write_toml(tmp_path, line + "\n")
    message = config_error(config_file=path)
    assert line.split(" ")[0] in message and "file" in message


def test_wrong_type_from_a_flag():
    message = config_error(flags={"burst": "lots"})
    assert "burst" in message and "flag" in message


@pytest.mark.parametrize("key, raw", [
    ("port", "65536"),
    ("port", "-1"),
    ("admin_port", "70000"),
    ("max_frame_bytes", "63"),
    ("max_text_chars", "0"),
    ("burst", "0"),
    ("max_strikes", "0"),
    ("rate", "0"),
    ("rate", "-1"),
    ("heartbeat", "-0.1"),
    ("idle_timeout", "-1"),
    ("history_size", "-1"),
    ("max_outbound_bytes", "1023"),
    ("workers", "0"),
    ("workers", "257"),
])
def test_out_of_range(key, raw):
    message = config_error(environ={BY_KEY[key].envvar: raw})
    assert key in message
    assert ">=" in message or "<=" in message


@pytest.mark.parametrize("key, raw", [("port", "65535"), ("max_frame_bytes", "64"), ("burst", "1"),
                                      ("rate", "0.001"), ("max_outbound_bytes", "1024")])
def test_range_boundaries_are_inclusive(key, raw):
    assert getattr(load(environ={BY_KEY[key].envvar: raw}), key) == BY_KEY[key].parse(raw, "test")


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity"])
@pytest.mark.parametrize("key", ["rate", "heartbeat", "drain_timeout"])
def test_non_finite_floats_are_rejected(key, raw):
    """nan compares false with every bound, so it would slip past the range checks."""
    assert key in config_error(environ={BY_KEY[key].envvar: raw})


@pytest.mark.parametrize("line", ["rate = nan", "heartbeat = inf", "resume_window = -inf", "port = nan"])
def test_non_finite_floats_are_rejected_from_the_file(tmp_path, line):
    path = write_toml(tmp_path, line + "\n")
    assert line.split(" ")[0] in config_error(config_file=path)


@pytest.mark.parametrize("key, raw", [("auth", "basic"), ("auth", "JWT"), ("log_level", "verbose"),
                                      ("log_format", "xml")])
def test_choices(key, raw):
    message = config_error(environ={BY_KEY[key].envvar: raw})
    assert key in message and "one of" in message


# ---------------------------------------------------------------- relations between keys


@pytest.mark.parametrize("settings, fragment", [
    ({"auth": "jwt"}, "jwt_secret"),
    ({"auth": "jwt", "jwt_secret": "s", "jwt_public_key": "/k.pem"}, "not both"),
    ({"jwt_secret": "s", "jwt_public_key": "/k.pem"}, "not both"),
    ({"tls_cert": "/c.pem"}, "tls_key"),
    ({"tls_key": "/k.pem"}, "tls_cert"),
    ({"broker": "postgres://db"}, "broker"),
    ({"broker": ""}, "broker"),
    ({"workers": 2}, "broker"),
])
def test_bad_relations(settings, fragment):
    with pytest.raises(ConfigError) as info:
        Config(**settings)
    assert fragment in str(info.value)
    message = config_error(flags=settings)  # load reports them too, after layering
    assert fragment in message


def test_bad_relation_assembled_from_two_layers(tmp_path):
    path = write_toml(tmp_path, 'auth = "jwt"\n')
    assert "jwt_secret" in config_error(config_file=path)
    config = load(config_file=path, environ={"GOCHAT_JWT_SECRET": SECRET})
    assert (config.auth, config.jwt_secret) == ("jwt", SECRET)


@pytest.mark.parametrize("settings", [
    {"auth": "jwt", "jwt_secret": SECRET},
    {"auth": "jwt", "jwt_secret": "x" * 32},
    {"auth": "jwt", "jwt_public_key": "/k.pem", "jwt_audience": "chat"},
    {"tls_cert": "/c.pem", "tls_key": "/k.pem"},
    {"broker": "redis://localhost:6379/0", "workers": 4},
    {"broker": "rediss://cache:6380/1"},
    {"broker": "unix:///run/redis.sock"},
])
def test_good_relations(settings):
    config = Config(**settings)
    for key, value in settings.items():
        assert getattr(config, key) == value


def test_replace_revalidates():
    with pytest.raises(ConfigError):
        Config().replace(auth="jwt")


# ---------------------------------------------------------------- secrets (PROTOCOL.md section 9)


@pytest.mark.parametrize("secret", ["x", "s3cret", "x" * 31, "é" * 15])  # 30 bytes in UTF-8
def test_a_weak_hs256_secret_is_refused_naming_the_key_not_the_secret(secret):
    message = config_error(environ={"GOCHAT_AUTH": "jwt", "GOCHAT_JWT_SECRET": secret})
    assert f"jwt_secret is {len(secret.encode())} bytes" in message and "at least 32" in message
    assert secret not in message.split("bytes", 1)[1]


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://gochat:p%40ss:word@cache/1", "redis://gochat:***@cache/1"),
    ("rediss://cache:6380/0?password=pw&ssl_cert_reqs=none", "rediss://cache:6380/0?password=***&ssl_cert_reqs=none"),
    ("unix://:pw@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
    ("redis://gochat@cache:6379/0", "redis://gochat@cache:6379/0"),  # a user name alone is no secret
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("memory", "memory"),
])
def test_broker_urls_are_shown_with_the_password_masked(url, shown):
    assert mask_url(url) == shown
    assert Config(broker=url).shown("broker") == shown


def test_secret_settings_are_declared_once_and_masked_everywhere():
    assert {s.key for s in SETTINGS if s.secret} == {"jwt_secret", "broker"}
    config = Config(jwt_secret=SECRET, broker="redis://:a-long-redis-password@cache:6379/0")
    assert config.shown("jwt_secret") == "***" and config.shown("port") == 9000
    line = f"auth with {SECRET} to redis://:a-long-redis-password@cache:6379/0 failed"
    assert config.scrub(line) == "auth with *** to redis://:***@cache:6379/0 failed"
    assert Config().secret_values() == [] and Config().shown("jwt_secret") is None


def test_errors_about_a_secret_setting_do_not_quote_it():
    message = config_error(flags={"broker": "http://:hunter2@cache"})
    assert "hunter2" not in message and "http://:***@cache" in message
