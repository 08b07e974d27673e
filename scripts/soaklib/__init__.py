"""Helpers of scripts/soak.py: the attacks (each run in a worker process of its own) and the
steady chat load that checks, while they run, that no acked message is ever lost."""

# The soak server's configuration. Short timeouts, so that reclaiming is visible within a
# run, yet long enough that a load process starved of CPU on a small machine (every attack
# at once) does not miss them itself. history_size bounds what each room retains: every
# room an attack creates keeps its history for good (see docs/robustness.md).
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
    "history_size": 500,
}
