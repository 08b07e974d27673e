#!/usr/bin/env bash
# Kernel and resource-limit settings for a large gochat deployment (hundreds of thousands of
# TCP connections per machine), shown as "current -> recommended" and applied only on request.
#
#   bash scripts/tune-sysctl.sh                 # dry run: print every setting, change nothing
#   sudo bash scripts/tune-sysctl.sh --apply    # set them now and persist them
#   bash scripts/tune-sysctl.sh --write DIR     # write the two config files into DIR only
#   bash scripts/tune-sysctl.sh --help
#
# --apply writes /etc/sysctl.d/90-gochat.conf (loaded at boot), loads it with sysctl, and
# writes /etc/security/limits.d/90-gochat.conf (nofile for login sessions). A systemd
# service does not read limits.d: its LimitNOFILE= sets the limit (deploy/systemd), and in
# Kubernetes the container runtime does. Settings the machine already exceeds are kept: the
# script never lowers a limit that is higher than it recommends.
set -euo pipefail

SYSCTL_FILE=/etc/sysctl.d/90-gochat.conf
LIMITS_FILE=/etc/security/limits.d/90-gochat.conf
NOFILE=1048576 # open files per process: one per connection, plus ~20 (listeners, admin, logs, broker)

# name | mode | recommended | why
#   mode min: raise to at least this; max: lower to at most this; set: this exact value;
#   buf: "min default max" buffer sizes: the default as given, min and max never lowered
SETTINGS=(
  # Listen backlog cap: listen(2) is truncated to it. A node that drains sends its clients
  # to the others within reconnect_after (1-5 s): tens of thousands of connects a second
  # that must wait in the accept queue, not be dropped. gochat asks for socket.SOMAXCONN
  # (4096 on current Python builds) per listener, each worker of --workers has its own.
  "net.core.somaxconn|min|65535|accept queue per listening socket (reconnect storms after a drain)"
  # Half-open connections (SYN received, handshake not done) kept per listener.
  "net.ipv4.tcp_max_syn_backlog|min|65535|half-open connections per listener during connect bursts"
  # Packets queued between the network card and the TCP stack when the stack falls behind.
  "net.core.netdev_max_backlog|min|16384|packets queued from the NIC when the kernel falls behind"
  # System-wide cap on open file descriptors: every connection is one.
  "fs.file-max|min|2097152|open files on the whole machine (all processes)"
  # Per-process ceiling for RLIMIT_NOFILE: the nofile limit below cannot exceed it.
  "fs.nr_open|min|$NOFILE|largest nofile limit a process may be given"
  # Ports for OUTGOING connections: a node's connections to Redis, a proxy or load
  # balancer in front of gochat, and load generators (scripts/loadgen) use one each per
  # destination. Inbound chat connections use none.
  # Starting at 10240 keeps ephemeral ports off the usual service ports (gochat's 9000 and
  # 9001, Redis's 6379), which an outgoing connection could otherwise be holding.
  "net.ipv4.ip_local_port_range|set|10240 65535|source ports for outgoing connections (proxies, loadgen, redis)"
  # Socket receive and send buffers: min, default, max bytes; the kernel autotunes between
  # them. Buffer memory is only taken for data in flight (an idle socket costs a few KB of
  # kernel memory whatever these say), but the default is what each socket may hold before
  # autotuning grows it: with a million sockets and a broadcast burst queued in the kernel
  # for slow readers, a small default keeps that worst case bounded (net.ipv4.tcp_mem caps
  # the total). It is memory outside gochat's max_outbound_bytes accounting.
  "net.ipv4.tcp_rmem|buf|4096 16384 4194304|receive buffer min/default/max per socket (small default bounds bursts)"
  "net.ipv4.tcp_wmem|buf|4096 16384 4194304|send buffer min/default/max per socket"
  # How long an orphaned socket stays in FIN-WAIT-2 (default 60 s): a drain or a mass
  # disconnect leaves one per client.
  "net.ipv4.tcp_fin_timeout|max|15|seconds in FIN-WAIT-2 after close (mass disconnects, drains)"
  # Reuse TIME-WAIT sockets for new OUTGOING connections (safe with TCP timestamps); helps
  # proxies and load generators that open many short connections. No effect on inbound.
  "net.ipv4.tcp_tw_reuse|set|1|reuse TIME-WAIT ports for outgoing connections"
  # Keepalive probes: gochat turns SO_KEEPALIVE on for every socket to find dead text-mode
  # peers (they get no heartbeat). The default waits 2 hours before the first probe.
  "net.ipv4.tcp_keepalive_time|max|300|seconds idle before TCP keepalive probes start (default 7200)"
  # Connection tracking table (only when netfilter/conntrack is loaded, as on most
  # Kubernetes nodes and NAT gateways): a full table silently drops new connections.
  "net.netfilter.nf_conntrack_max|min|2097152|tracked connections (iptables/NAT, Kubernetes nodes)"
)

usage() {
  cat <<'EOF'
Usage: tune-sysctl.sh [--apply | --write DIR] [--help]

Kernel and resource limits for a large gochat deployment. With no option, prints each
setting as "current -> recommended" and changes nothing.

  --apply      as root: set the values now (sysctl) and persist them in
               /etc/sysctl.d/90-gochat.conf and /etc/security/limits.d/90-gochat.conf
  --write DIR  write those two files (90-gochat-sysctl.conf, 90-gochat-limits.conf) into
               DIR instead, for configuration management or an image build; no change
  --help       this text

A value the machine already exceeds is kept (limits are never lowered). Settings whose
key this kernel lacks (e.g. nf_conntrack_max without conntrack) are listed and skipped.
systemd services take their open-file limit from LimitNOFILE= (deploy/systemd/gochat.service),
not from limits.d.
EOF
}

mode=dry
out_dir=
while [ $# -gt 0 ]; do
  case "$1" in
    --apply) mode=apply ;;
    --write)
      [ $# -ge 2 ] || { echo "tune-sysctl.sh: --write needs a directory" >&2; exit 2; }
      mode=write; out_dir=$2; shift ;;
    --write=*) mode=write; out_dir=${1#--write=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tune-sysctl.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = apply ] && [ "$(id -u)" != 0 ]; then
  echo "tune-sysctl.sh: --apply must run as root (sudo bash $0 --apply)" >&2
  exit 1
fi

proc_path() { echo "/proc/sys/${1//.//}"; }

# The current value, whitespace normalised ("4096	131072	6291456" -> "4096 131072 6291456").
current() {
  local path
  path=$(proc_path "$1")
  [ -r "$path" ] || return 1
  tr -s ' \t' ' ' <"$path" | sed 's/ *$//'
}

# What to set: the recommended value, unless the current one already satisfies the mode.
target() {
  local mode=$1 now=$2 want=$3
  case "$mode" in
    min) if [ "$now" -ge "$want" ] 2>/dev/null; then echo "$now"; else echo "$want"; fi ;;
    max) if [ "$now" -le "$want" ] 2>/dev/null; then echo "$now"; else echo "$want"; fi ;;
    buf)
      local n1 n2 n3 w1 w2 w3
      read -r n1 n2 n3 <<<"$now"
      read -r w1 w2 w3 <<<"$want"
      echo "$((n1 > w1 ? n1 : w1)) $w2 $((n3 > w3 ? n3 : w3))" ;;
    *) echo "$want" ;;
  esac
}

sysctl_lines=()
changes=0
printf '%-32s %-24s    %-24s %s\n' "setting" "current" "recommended" ""
for entry in "${SETTINGS[@]}"; do
  IFS='|' read -r name kind want why <<<"$entry"
  if ! now=$(current "$name"); then
    printf '%-32s %-24s    %-24s %s\n' "$name" "(not on this kernel)" "$want" "skipped: $why"
    continue
  fi
  new=$(target "$kind" "$now" "$want")
  if [ "$new" = "$now" ]; then
    note="ok"
  else
    note="change"
    changes=$((changes + 1))
  fi
  printf '%-32s %-24s -> %-24s %s: %s\n' "$name" "$now" "$new" "$note" "$why"
  sysctl_lines+=("# $why" "$name = $new")
done

soft=$(ulimit -Sn)
hard=$(ulimit -Hn)
nofile_note=ok
if [ "$hard" != unlimited ] && [ "$hard" -lt "$NOFILE" ]; then
  nofile_note=change
  changes=$((changes + 1))
fi
printf '%-32s %-24s -> %-24s %s: %s\n' "nofile (limits.d, this shell)" "soft $soft hard $hard" \
  "soft $NOFILE hard $NOFILE" "$nofile_note" "open files per process (systemd: LimitNOFILE=)"
echo "$changes setting(s) differ from the recommendation."

sysctl_file_text() {
  echo "# gochat: kernel settings for many TCP connections (scripts/tune-sysctl.sh)"
  printf '%s\n' "${sysctl_lines[@]}"
}

limits_file_text() {
  echo "# gochat: open files per process for login sessions (scripts/tune-sysctl.sh)."
  echo "# systemd services ignore this file: set LimitNOFILE= in the unit instead."
  echo "*    soft nofile $NOFILE"
  echo "*    hard nofile $NOFILE"
  echo "root soft nofile $NOFILE"
  echo "root hard nofile $NOFILE"
}

case "$mode" in
  dry)
    echo "Dry run: nothing changed. Apply with: sudo bash $0 --apply"
    ;;
  write)
    mkdir -p "$out_dir"
    sysctl_file_text >"$out_dir/90-gochat-sysctl.conf"
    limits_file_text >"$out_dir/90-gochat-limits.conf"
    echo "Wrote $out_dir/90-gochat-sysctl.conf and $out_dir/90-gochat-limits.conf; nothing changed."
    ;;
  apply)
    # fs.nr_open is set before the nofile limits can use it: the sysctl file comes first.
    sysctl_file_text >"$SYSCTL_FILE"
    limits_file_text >"$LIMITS_FILE"
    sysctl -p "$SYSCTL_FILE"
    echo "Applied and persisted in $SYSCTL_FILE and $LIMITS_FILE."
    echo "New login sessions get nofile $NOFILE; restart gochat (systemd: LimitNOFILE=) to use the new limits."
    ;;
esac
