#!/usr/bin/env bash
# Installs and verifies everything a host needs to send or receive a live migration.
# Idempotent: when everything is present and working it only runs the checks.
#
# Debian bookworm ships CRIU 3.17 (fails on new kernels) and an old podman, so this adds
# trixie (podman 5, runc, netavark) and sid (CRIU >= 4.2) as extra suites pinned LOW (100):
# nothing already installed is upgraded from them unless we ask by target release.
# CRIU locks a network namespace during a dump with iptables-restore, hence iptables.
set -euo pipefail

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (podman checkpoint/restore, CRIU and network namespaces need it). Re-run with sudo."

MIN_CRIU=40200 # 4.2.0: 4.1 cannot dump TCP sockets on Linux >= 6.16 (criu #2705)
# wireguard-go releases before 2023 have no TUN offloads (GSO/GRO): bookworm's 0.0.20220316
# forwards about 150 Mbit/s per direction here, sid's 0.0.20260522 about 600-1500.
MIN_WIREGUARD_GO=20230000

wireguard_go_date() {
    wireguard-go --version 2>/dev/null | sed -n 's/.*v0\.0\.\([0-9]\{8\}\).*/\1/p'
}

criu_version_code() {
    local v
    v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}') || return 1
    [ -n "$v" ] || return 1
    IFS=. read -r maj min sub <<<"$v"
    echo $((maj * 10000 + min * 100 + ${sub:-0}))
}

all_present() {
    local bin
    for bin in podman runc conmon criu wg wireguard-go nft iptables-restore conntrack ip iperf3 busybox tmux; do
        command -v "$bin" >/dev/null || return 1
    done
    [ -x /usr/lib/podman/netavark ] || return 1
    [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || return 1 # harness plots
    [ -x /usr/lib/podman/aardvark-dns ] || return 1
    local code
    code=$(criu_version_code) || return 1
    [ "$code" -ge "$MIN_CRIU" ] || return 1
    code=$(wireguard_go_date)
    [ -n "$code" ] && [ "$code" -ge "$MIN_WIREGUARD_GO" ]
}

debian_mirror() {
    # Reuse the mirror this machine already uses rather than naming a host here.
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list(.d); add one and re-run."
    echo "$uri"
}

install_packages() {
    command -v apt-get >/dev/null || die "apt-get not found: this setup supports Debian-based hosts. Install podman >= 5, runc, CRIU >= 4.2, wireguard-tools, wireguard-go, nftables, conntrack, iproute2, iperf3, busybox-static by hand."
    local mirror
    mirror=$(debian_mirror)
    local src=/etc/apt/sources.list.d/live-migrate-extra.sources
    local pin=/etc/apt/preferences.d/live-migrate-extra
    if [ ! -f "$src" ]; then
        say "adding Debian trixie and sid suites (pinned low) from $mirror"
        cat >"$src" <<SRC
Types: deb
URIs: $mirror
Suites: trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        cat >"$pin" <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=sid
Pin-Priority: 100
PIN
    fi
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed: check the network access to the Debian mirror."
    say "installing base tools (bookworm)"
    apt-get install -y -qq --no-install-recommends \
        wireguard-tools nftables iptables conntrack iproute2 iperf3 busybox-static \
        tmux util-linux procps ca-certificates fonts-dejavu-core >/dev/null
    say "installing podman, runc, conmon, netavark, aardvark-dns (trixie)"
    apt-get install -y -qq --no-install-recommends -t trixie \
        podman runc conmon netavark aardvark-dns containers-storage catatonit >/dev/null \
        || die "installing podman from trixie failed (see apt output above)."
    say "installing CRIU and wireguard-go (sid)"
    apt-get install -y -qq --no-install-recommends -t sid criu libcompel1 >/dev/null \
        || die "installing CRIU from sid failed: CRIU >= 4.2 is required."
    apt-get install -y -qq --no-install-recommends -t sid wireguard-go >/dev/null \
        || die "installing wireguard-go from sid failed: a release with TUN offloads (2023 or later) is needed for the forwarded path's speed."
}

configure_containers() {
    # crun fails on hybrid cgroups here and there is no systemd: pin runc and cgroupfs.
    mkdir -p /etc/containers
    local conf=/etc/containers/containers.conf.d/50-live-migrate.conf
    mkdir -p "$(dirname "$conf")"
    if [ ! -f "$conf" ]; then
        cat >"$conf" <<CONF
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[containers]
log_driver = "k8s-file"
CONF
    fi
    [ -f /etc/containers/policy.json ] || cat >/etc/containers/policy.json <<POL
{ "default": [ { "type": "insecureAcceptAnything" } ] }
POL
}

# Post-copy: CRIU's page server sizes its pipes to 4 MiB, which beyond fs.pipe-max-size
# (1 MiB by default) needs CAP_SYS_RESOURCE. Root normally has it; where it does not (some
# sandboxes), the limit is raised instead. CRIU's configuration directory is made too.
configure_post_copy() {
    mkdir -p /etc/criu
    local capeff
    capeff=$(awk '/^CapEff:/{print $2}' /proc/self/status)
    if (( (16#$capeff >> 24) & 1 )); then
        return 0
    fi
    if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
        say "no CAP_SYS_RESOURCE here: raising fs.pipe-max-size to 4 MiB for CRIU's page server (post-copy)"
        echo 4194304 >/proc/sys/fs/pipe-max-size \
            || say "could not raise fs.pipe-max-size: post-copy is unavailable on this host (agent-client check says so)"
    fi
}

verify() {
    local code
    code=$(criu_version_code) || die "criu not runnable after install."
    [ "$code" -ge "$MIN_CRIU" ] || die "CRIU $(criu --version | awk '/^Version:/{print $2}') is too old: >= 4.2 is needed (4.1 cannot dump TCP sockets on Linux >= 6.16). Install it from Debian sid: apt-get install -t sid criu."
    criu check >/dev/null 2>&1 || die "'criu check' failed: $(criu check 2>&1 | tail -n 3)"
    command -v runc >/dev/null || die "runc missing: crun does not work with hybrid cgroups; install runc."
    podman --version >/dev/null || die "podman not runnable."
    verify_tcp_checkpoint
}

# A real dump of a process holding an established TCP connection: the step that fails with
# CRIU < 4.2 on Linux >= 6.16. (Restore is exercised by the end-to-end tests through podman:
# outside a PID namespace CRIU cannot reclaim the dumped PIDs here.) Checked once per CRIU version and kernel (stamp file).
verify_tcp_checkpoint() {
    local stamp=/var/lib/live-migrate/tcp-checkpoint-ok
    local want
    want="$(criu --version | head -n1) $(uname -r)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "verifying CRIU can checkpoint an established TCP connection"
    local ns="lmsetup-$$" dir pid
    dir=$(mktemp -d)
    ip netns add "$ns"
    # shellcheck disable=SC2064 # expand now: the values are fixed
    trap "ip netns pids $ns 2>/dev/null | xargs -r kill -9; ip netns del $ns 2>/dev/null; rm -rf $dir" EXIT
    ip -n "$ns" link set lo up
    # disown: the EXIT trap kills these jobs, and bash would report each as "Killed".
    nsenter --net="/run/netns/$ns" busybox nc -l -p 7000 -e /bin/cat </dev/null >/dev/null 2>&1 &
    disown
    sleep 0.3
    # setsid: CRIU dumps a whole session; the pipe keeps nc's stdin open.
    nsenter --net="/run/netns/$ns" setsid sh -c 'sleep 1000 | busybox nc 127.0.0.1 7000' </dev/null >/dev/null 2>&1 &
    pid=$!
    disown
    sleep 0.5
    criu dump -t "$pid" -D "$dir" --tcp-established -o dump.log >/dev/null 2>&1 \
        || die "CRIU cannot checkpoint an established TCP connection: $(grep Error "$dir/dump.log" | grep -v RLIMIT | tail -n 2)"
    mkdir -p "$(dirname "$stamp")"
    echo "$want" >"$stamp"
    say "CRIU TCP checkpoint: ok"
}

if all_present; then
    configure_containers
    configure_post_copy
    verify
    say "host ready (nothing to install)"
    exit 0
fi
install_packages
configure_containers
configure_post_copy
all_present || die "some tools are still missing after install: check the apt output above."
verify
say "host ready"
