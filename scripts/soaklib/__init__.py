"""Helpers of scripts/soak.py: the attacks (each run in a worker process of its own) and the
steady chat load that checks, while they run, that no acked message is ever lost."""

# The soak server's configuration. Short timeouts, so that reclaiming is visible within a
# run, yet long enough that a load process starved of CPU on a small machine (every attack
# at once) does not miss them itself. history_size (the default, 1000) bounds what each room
# retains: every room an attack creates keeps its history for good (see docs/robustness.md),
# and max_rooms bounds how many rooms: 12,000 instead of the default 100,000, so that the room
# flood (100 sessions holding 99 rooms each, 9,900 in all, and creating more within their
# rate limit) passes it within its wave, while the rooms it holds leave others room to create
# theirs (a join that would pass max_rooms when every room has members is refused).
SETTINGS = {
    "max_connections": 10000,
    "max_conns_per_ip": 100,
    "handshake_timeout": 4,
    "heartbeat": 2,
    "idle_timeout": 5,
    "resume_window": 5,
    "rate": 100,
    "burst": 200,
    "max_strikes": 50,
    "max_outbound_bytes": 256 * 1024,
    "max_frame_bytes": 16384,  # what tests/test_robustness.py's garbage catalog is written for
    "history_size": 1000,
    "max_rooms": 12000,
    "max_rooms_per_session": 100,
    "max_history_bytes": 256 * 1024,
}

# The second server, for the silent TLS sockets: the same settings over TLS, with a
# max_connections small enough that one address's silent sockets (SILENT_TLS_SOCKETS in
# soaklib/hostile.py) outnumber its handler pool (max_connections + 64) when handshakes are
# not counted, yet large enough that max_conns_per_ip keeps that address well under it.
TLS_MAX_CONNECTIONS = 300
TLS_SETTINGS = {**SETTINGS, "max_connections": TLS_MAX_CONNECTIONS}
