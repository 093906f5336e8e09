#!/usr/bin/env bash
# testbed.sh: three real OpenSSH hosts on this machine, for fleet's tests and demo.
#
#   scripts/testbed.sh up [netns|loopback]   start the hosts (default: netns)
#   scripts/testbed.sh down                  stop them and remove their network (idempotent)
#   scripts/testbed.sh status                variant, hosts and namespaces
#   scripts/testbed.sh stop HOST | start HOST      crash a host (sshd and every process on it) / boot it again
#   scripts/testbed.sh nosftp HOST | sftp HOST     restart a host with its SFTP subsystem off / on
#   scripts/testbed.sh cut HOST | heal HOST        netns: drop / restore HOST's link silently
#   scripts/testbed.sh shape HOST RATE | unshape HOST   netns: limit HOST's bandwidth both ways (e.g. 100mbit)
#   scripts/testbed.sh wall on|off                 netns: hosts refuse SSH from this machine (only the bastion lets it in)
#   scripts/testbed.sh firewall HOST | nofirewall HOST  netns: HOST accepts only ports 22 and 29500 (nft)
#
# Each host is an sshd that is PID 1 of its own PID, mount and UTS namespaces: stopping it kills
# every process started on it, `hostname` prints hostN, /root and /home are private to it, and a
# login `train` (uid 2001, login shell fish where installed) exists only inside it. /tmp is shared
# with this machine. /opt/fleet (the torch venv of scripts/setup.sh) is each host's own
# copy-on-write view of this machine's (overlayfs): what a host writes there stays on that host,
# as on separate PCs. pip on the hosts is offline (no index; ~/.config/pip/pip.conf), as the
# hosts cannot reach the internet.
#
# A fourth host, `bastion` (index TB_N+1), is a jump host: made like the others, in known_hosts
# and ssh_config, but not in hosts.tsv or fleet.toml (bastion.tsv has its line). With `wall on`
# the hosts refuse SSH from this machine's address, as a lab network does, and only the bastion
# reaches them.
#
#   netns     host i is network namespace ${TB_NS_PREFIX}host$i with address $TB_SUBNET.(10+i), port 22,
#             its eth0 on bridge $TB_BRIDGE ($TB_SUBNET.1/24). Hosts reach each other (ranks can meet
#             at rank 0). An "unreachable" route for the subnet is kept so that traffic for it can
#             never leave through this machine's default route.
#   loopback  host i is 127.0.0.1 port $((TB_PORT_BASE + i)); no cut/shape.
#
# Written to $TB_DIR: id_ed25519 (client key, authorised for root and train), known_hosts (the
# hosts' ed25519 keys; known_hosts_ecdsa holds their ECDSA keys alone),
# ssh_config (ssh -F $TB_DIR/ssh_config host1), hosts.tsv (name addr port netns) and fleet.toml,
# an inventory for the hosts (user root, device cpu, workdir $TB_DIR/work/<host>, emptied by `up`;
# OMP_NUM_THREADS for every rank is this machine's cores shared out among the hosts, at least 1,
# as separate machines would not compete for each other's cores).
#
# Environment: TB_DIR (/tmp/fleet-testbed), TB_N (3), TB_PORT_BASE (2200), TB_NS_PREFIX (tb-),
# TB_BRIDGE (tbbr0), TB_SUBNET (10.213.0), TB_PRIVATE_HOME (1; 0 shares /root and /home).
# Needs root and the Debian packages openssh-server, openssh-client, iproute2 (scripts/setup.sh).
set -euo pipefail

TB_DIR=${TB_DIR:-/tmp/fleet-testbed}
TB_N=${TB_N:-3}
TB_PORT_BASE=${TB_PORT_BASE:-2200}
TB_NS_PREFIX=${TB_NS_PREFIX:-tb-}
TB_BRIDGE=${TB_BRIDGE:-tbbr0}
TB_SUBNET=${TB_SUBNET:-10.213.0}
TB_PRIVATE_HOME=${TB_PRIVATE_HOME:-1}
SSHD=/usr/sbin/sshd
# The login `train` has fish as its login shell where it is installed (scripts/setup.sh does):
# fish reads quoting differently from sh, as tcsh does, so fleet must never rely on it.
TRAIN_SHELL=/bin/bash
[[ ! -x /usr/bin/fish ]] || TRAIN_SHELL=/usr/bin/fish

log() { printf 'testbed: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

variant() { cat "$TB_DIR/state" 2>/dev/null || echo none; }

# Every host the bed runs: host1..hostN and the bastion.
TB_ALL=$((TB_N + 1))

host_index() {
  if [[ ${1:-} == bastion ]]; then echo "$TB_ALL"; return; fi
  [[ ${1:-} =~ ^host([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 1 && BASH_REMATCH[1] <= TB_N)) || die "no such host: ${1:-}"
  echo "${BASH_REMATCH[1]}"
}

host_name() { if (($1 <= TB_N)); then echo "host$1"; else echo bastion; fi; }

host_addr() { # variant index
  case $1 in
    loopback) echo 127.0.0.1 ;;
    netns) echo "$TB_SUBNET.$((10 + $2))" ;;
  esac
}

host_port() { # variant index
  case $1 in
    loopback) echo $((TB_PORT_BASE + $2)) ;;
    netns) echo 22 ;;
  esac
}

host_ns() { [[ $1 == netns ]] && echo "${TB_NS_PREFIX}$(host_name "$2")" || true; }

# Refuses to go on unless addr is routed to loopback or to our own bridge.
check_route() { # addr variant
  local route
  route=$(ip -o route get "$1" 2>/dev/null || true)
  case $2 in
    netns) [[ $route == *" dev $TB_BRIDGE "* ]] || die "route to $1 is not via $TB_BRIDGE: $route" ;;
    *) [[ $route == "local $1 dev lo "* ]] || die "route to $1 is not local: $route" ;;
  esac
}

# Is addr:port listening, by process pid when given?
listening() { # netns addr port [pid]
  local out
  if [[ -n $1 ]]; then out=$(ip netns exec "$1" ss -ltnpH "src $2:$3"); else out=$(ss -ltnpH "src $2:$3"); fi
  [[ -n $out ]] && { [[ -z ${4:-} ]] || [[ $out == *"pid=$4,"* ]]; }
}

# True while pid is a live (not zombie) process whose command line contains the pattern.
alive() { # pid [pattern]
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z && $state != X ]] || return 1
  [[ -z ${2:-} ]] || tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"
}

net_up() {
  ip link add "$TB_BRIDGE" type bridge
  ip addr add "$TB_SUBNET.1/24" dev "$TB_BRIDGE"
  ip link set "$TB_BRIDGE" up
  ip route add unreachable "$TB_SUBNET.0/24" metric 4242
  # Bridged IPv4 passes iptables FORWARD when bridge-nf-call-iptables is on; a DROP policy
  # (Docker sets one) would cut the hosts off from each other.
  if iptables -S FORWARD 2>/dev/null | grep -q -- '-P FORWARD DROP'; then
    iptables -I FORWARD -i "$TB_BRIDGE" -o "$TB_BRIDGE" -j ACCEPT
    touch "$TB_DIR/iptables_rule"
  fi
  local i ns
  for ((i = 1; i <= TB_ALL; i++)); do
    ns=$(host_ns netns "$i")
    ip netns add "$ns"
    ip link add "${TB_BRIDGE}v$i" type veth peer name eth0 netns "$ns"
    ip link set "${TB_BRIDGE}v$i" master "$TB_BRIDGE" up
    ip -n "$ns" addr add "$(host_addr netns "$i")/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
}

net_down() {
  local i ns pids
  for ((i = 1; i <= TB_ALL; i++)); do
    ns=$(host_ns netns "$i")
    if [[ -e /run/netns/$ns ]]; then
      pids=$(ip netns pids "$ns" || true)
      # shellcheck disable=SC2086
      [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
      ip netns del "$ns" || true
    fi
    ip link del "${TB_BRIDGE}v$i" 2>/dev/null || true
  done
  ip link del "$TB_BRIDGE" 2>/dev/null || true
  while ip route del unreachable "$TB_SUBNET.0/24" metric 4242 2>/dev/null; do :; done
  if [[ -f $TB_DIR/iptables_rule ]]; then
    iptables -D FORWARD -i "$TB_BRIDGE" -o "$TB_BRIDGE" -j ACCEPT || true
  fi
}

# Host key, sshd_config, private passwd/group and the script that boots the host.
write_host() { # variant index
  local v=$1 i=$2 name dir addr port entry
  name=$(host_name "$2")
  dir="$TB_DIR/$name"
  addr=$(host_addr "$v" "$i")
  port=$(host_port "$v" "$i")
  rm -rf "$dir"
  mkdir -p "$dir/root" "$dir/home/train" "$dir/etc" "$dir/opt-upper" "$dir/opt-work"
  chmod 755 "$dir" "$dir/home"
  chmod 700 "$dir/root"
  chown 2001:2001 "$dir/home/train"
  local home
  for home in "$dir/root" "$dir/home/train"; do
    mkdir -p "$home/.config/pip"
    printf '[global]\nno-index = true\ndisable-pip-version-check = true\n' >"$home/.config/pip/pip.conf"
  done
  chown -R 2001:2001 "$dir/home/train/.config"
  ssh-keygen -q -t ed25519 -N '' -C "$name" -f "$dir/ssh_host_ed25519_key"
  ssh-keygen -q -t ecdsa -N '' -C "$name" -f "$dir/ssh_host_ecdsa_key"
  cp "$TB_DIR/id_ed25519.pub" "$dir/authorized_keys"
  { cat /etc/passwd; echo "train:x:2001:2001:test bed user:/home/train:$TRAIN_SHELL"; } >"$dir/etc/passwd"
  { cat /etc/group; echo "train:x:2001:"; } >"$dir/etc/group"
  chmod 644 "$dir/etc/passwd" "$dir/etc/group" "$dir/authorized_keys"
  cat >"$dir/sshd_config" <<CONFIG
Port $port
ListenAddress $addr
HostKey $dir/ssh_host_ed25519_key
HostKey $dir/ssh_host_ecdsa_key
PidFile none
AuthorizedKeysFile $dir/authorized_keys
# $TB_DIR is under world-writable /tmp, which StrictModes would refuse.
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
# MaxSessions (10) and MaxStartups (10:30:100) stay at OpenSSH's defaults: real hosts have them.
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel VERBOSE
CONFIG
  $SSHD -t -f "$dir/sshd_config"
  if [[ $port == 22 ]]; then entry=$addr; else entry="[$addr]:$port"; fi
  echo "$entry $(cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub")" >>"$TB_DIR/known_hosts"
  echo "$entry $(cut -d' ' -f1,2 "$dir/ssh_host_ecdsa_key.pub")" >>"$TB_DIR/known_hosts_ecdsa"
  printf 'Host %s\n  HostName %s\n  Port %s\n' "$name" "$addr" "$port" >>"$TB_DIR/ssh_config"
  local tsv=$TB_DIR/hosts.tsv
  ((i <= TB_N)) || tsv=$TB_DIR/bastion.tsv
  printf '%s\t%s\t%s\t%s\n' "$name" "$addr" "$port" "$(host_ns "$v" "$i")" >>"$tsv"
  {
    echo "#!/bin/sh"
    echo "# Runs as PID 1 of the host's new pid, mount and uts namespaces."
    echo "set -e"
    echo "hostname $name"
    if [[ $TB_PRIVATE_HOME == 1 ]]; then
      echo "mount --bind '$dir/root' /root"
      echo "mount --bind '$dir/home' /home"
    fi
    if [[ -d /opt/fleet ]]; then
      echo "mount -t overlay overlay -o 'lowerdir=/opt/fleet,upperdir=$dir/opt-upper,workdir=$dir/opt-work' /opt/fleet \\"
      echo "  || echo 'testbed: no overlayfs here: /opt/fleet is shared with this machine' >&2"
    fi
    echo "mount --bind '$dir/etc/passwd' /etc/passwd"
    echo "mount --bind '$dir/etc/group' /etc/group"
    echo "exec $SSHD -D -f '$dir/sshd_config' -E '$dir/sshd.log'"
  } >"$dir/boot.sh"
  chmod 755 "$dir/boot.sh"
}

write_inventory() { # variant
  local i threads=$(($(nproc) / TB_N))
  {
    echo "# The test bed's hosts, written by scripts/testbed.sh."
    echo "[fleet]"
    echo "user = \"root\""
    echo "identity = \"$TB_DIR/id_ed25519\""
    echo "known_hosts = \"$TB_DIR/known_hosts\""
    echo "workdir = \"$TB_DIR/work\""
    echo "device = \"cpu\""
    echo "env = { OMP_NUM_THREADS = \"$(( threads > 1 ? threads : 1 ))\" }"
    echo "master_port = 29500"
    for ((i = 1; i <= TB_N; i++)); do
      echo
      echo "[[host]]"
      echo "name = \"host$i\""
      echo "address = \"$(host_addr "$1" "$i")\""
      echo "port = $(host_port "$1" "$i")"
      echo "workdir = \"$TB_DIR/work/host$i\""
    done
  } >"$TB_DIR/fleet.toml"
}

boot_host() { # variant index
  local v=$1 i=$2 dir ns addr port
  dir="$TB_DIR/$(host_name "$i")"
  ns=$(host_ns "$v" "$i")
  addr=$(host_addr "$v" "$i")
  port=$(host_port "$v" "$i")
  check_route "$addr" "$v"
  ! listening "$ns" "$addr" "$port" || die "$(host_name "$i"): $addr:$port is already in use"
  # --kill-child: if unshare dies, sshd (and with it the whole host) dies too.
  local -a enter=()
  [[ -z $ns ]] || enter=(ip netns exec "$ns")
  setsid "${enter[@]}" unshare --pid --uts --mount-proc --kill-child --propagation private \
    "$dir/boot.sh" </dev/null >"$dir/unshare.log" 2>&1 &
  echo $! >"$dir/unshare.pid"
}

# Polls until the host's sshd listens (5 s at most).
await_host() { # variant index
  local v=$1 i=$2 dir ns addr port n parent sshd=""
  dir="$TB_DIR/$(host_name "$i")"
  ns=$(host_ns "$v" "$i")
  addr=$(host_addr "$v" "$i")
  port=$(host_port "$v" "$i")
  parent=$(cat "$dir/unshare.pid")
  for ((n = 0; n < 500; n++)); do
    alive "$parent" || break
    [[ -n $sshd ]] || sshd=$(pgrep -P "$parent" -x sshd || true)
    [[ -n $sshd ]] && listening "$ns" "$addr" "$port" "$sshd" && return 0
    sleep 0.01
  done
  cat "$dir/unshare.log" "$dir/sshd.log" >&2 2>/dev/null || true
  die "$(host_name "$i"): sshd is not listening on $addr:$port"
}

# SIGKILL to sshd, PID 1 of the host's pid namespace: the kernel kills every process of the host.
halt_host() { # index
  local dir parent child n
  dir="$TB_DIR/$(host_name "$1")"
  [[ -f $dir/unshare.pid ]] || return 0
  parent=$(cat "$dir/unshare.pid")
  if alive "$parent" unshare; then
    for child in $(pgrep -P "$parent" || true); do kill -KILL "$child" 2>/dev/null || true; done
    for ((n = 0; n < 300; n++)); do alive "$parent" unshare || break; sleep 0.01; done
    if alive "$parent" unshare; then kill -KILL "$parent" 2>/dev/null || true; fi
  fi
  rm -f "$dir/unshare.pid"
}

cmd_up() {
  local v=${1:-netns} i
  case $v in loopback | netns) ;; *) die "unknown variant $v (netns or loopback)" ;; esac
  [[ $(id -u) == 0 ]] || die "must run as root"
  [[ -x $SSHD ]] || die "$SSHD is missing: run scripts/setup.sh (or apt-get install openssh-server)"
  [[ ! -e $TB_DIR/state ]] || die "$TB_DIR/state exists: run '$0 down' first"
  mkdir -p "$TB_DIR" /run/sshd # /run/sshd: sshd's privilege separation directory
  chmod 0755 /run/sshd
  echo "$v" >"$TB_DIR/state"
  trap 'rc=$?; if ((rc != 0)); then log "up failed, tearing down"; cmd_down; fi' EXIT
  : >"$TB_DIR/known_hosts"
  : >"$TB_DIR/known_hosts_ecdsa"
  : >"$TB_DIR/hosts.tsv"
  : >"$TB_DIR/bastion.tsv"
  rm -rf "$TB_DIR/work"
  rm -f "$TB_DIR/id_ed25519" "$TB_DIR/id_ed25519.pub"
  ssh-keygen -q -t ed25519 -N '' -C fleet-testbed-client -f "$TB_DIR/id_ed25519"
  cat >"$TB_DIR/ssh_config" <<CONFIG
Host *
  User root
  IdentityFile $TB_DIR/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $TB_DIR/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  BatchMode yes
  LogLevel ERROR
CONFIG
  [[ $v != netns ]] || net_up
  for ((i = 1; i <= TB_ALL; i++)); do write_host "$v" "$i"; done
  write_inventory "$v"
  for ((i = 1; i <= TB_ALL; i++)); do boot_host "$v" "$i"; done
  for ((i = 1; i <= TB_ALL; i++)); do await_host "$v" "$i"; done
  trap - EXIT
  log "up ($v): $(tr '\t\n' ' ;' <"$TB_DIR/hosts.tsv")"
}

cmd_down() {
  local v i
  v=$(variant)
  for ((i = 1; i <= TB_ALL; i++)); do halt_host "$i"; done
  # Also clean up the network of a crashed run whose state file is gone.
  if [[ $v == netns ]] || ip link show "$TB_BRIDGE" >/dev/null 2>&1 || ip netns list | grep -q "^${TB_NS_PREFIX}host"; then
    net_down
  fi
  rm -f "$TB_DIR/state" "$TB_DIR/iptables_rule"
  log "down ($v)"
}

need_netns() { [[ $(variant) == netns ]] || die "$1 needs the netns variant"; }

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) variant; cat "$TB_DIR/hosts.tsv" 2>/dev/null || true; ip netns list ;;
  stop) i=$(host_index "${2:-}"); halt_host "$i"; log "$2 stopped" ;;
  nosftp | sftp)
    # Restarts HOST with its SFTP subsystem off (nosftp) or back on (sftp): exec works, SFTP fails.
    i=$(host_index "${2:-}")
    server=/usr/lib/openssh/sftp-server
    [[ $1 == sftp ]] || server=/bin/false
    sed -i "s|^Subsystem sftp .*|Subsystem sftp $server|" "$TB_DIR/$2/sshd_config"
    halt_host "$i"; boot_host "$(variant)" "$i"; await_host "$(variant)" "$i"
    log "$2 restarted with SFTP $([[ $1 == sftp ]] && echo on || echo off)"
    ;;
  start) i=$(host_index "${2:-}"); boot_host "$(variant)" "$i"; await_host "$(variant)" "$i"; log "$2 started" ;;
  cut) need_netns cut; i=$(host_index "${2:-}"); ip link set "${TB_BRIDGE}v$i" down ;;
  heal) need_netns heal; i=$(host_index "${2:-}"); ip link set "${TB_BRIDGE}v$i" up ;;
  shape)
    need_netns shape
    i=$(host_index "${2:-}")
    rate=${3:?rate, e.g. 100mbit}
    tc qdisc replace dev "${TB_BRIDGE}v$i" root tbf rate "$rate" burst 64kb latency 50ms
    tc -n "$(host_ns netns "$i")" qdisc replace dev eth0 root tbf rate "$rate" burst 64kb latency 50ms
    ;;
  unshape)
    need_netns unshape
    i=$(host_index "${2:-}")
    tc qdisc del dev "${TB_BRIDGE}v$i" root 2>/dev/null || true
    tc -n "$(host_ns netns "$i")" qdisc del dev eth0 root 2>/dev/null || true
    ;;
  wall)
    need_netns wall
    case ${2:-} in on) action=-I ;; off) action=-D ;; *) die "wall on or wall off" ;; esac
    for ((i = 1; i <= TB_N; i++)); do
      rule=(INPUT -p tcp --dport 22 -s "$TB_SUBNET.1" -j REJECT --reject-with tcp-reset)
      if [[ $action == -I ]] || ip netns exec "$(host_ns netns "$i")" iptables -C "${rule[@]}" 2>/dev/null; then
        ip netns exec "$(host_ns netns "$i")" iptables "$action" "${rule[@]}"
      fi
    done
    log "wall $2: SSH from $TB_SUBNET.1 $([[ $2 == on ]] && echo refused || echo allowed) by host1..host$TB_N"
    ;;
  firewall)
    # As `ufw default deny incoming; ufw allow 22; ufw allow 29500` leaves a host: other
    # packets are dropped, so a connection to any other port times out.
    need_netns firewall
    i=$(host_index "${2:-}")
    ip netns exec "$(host_ns netns "$i")" nft -f - <<'RULES'
table inet testbed_firewall {
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iif lo accept
    ip protocol icmp accept
    tcp dport { 22, 29500 } accept
  }
}
RULES
    log "$2: firewall on (only 22 and 29500 accepted)"
    ;;
  nofirewall)
    need_netns nofirewall
    i=$(host_index "${2:-}")
    ip netns exec "$(host_ns netns "$i")" nft delete table inet testbed_firewall 2>/dev/null || true
    log "$2: firewall off"
    ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
