#!/usr/bin/env bash
# Builds one rootfs tarball per test workload into OUT_DIR, for `podman import`
# (the lab has no registry access). Each image is busybox + one workload +
# exactly the shared libraries it needs, because the Rust binaries are
# glibc-dynamic (no musl target here).
#
# Usage: containers/build-images.sh OUT_DIR
#
# Tarballs are byte-for-byte reproducible, and an existing tarball is only
# replaced when its content changed, so its mtime tells the lab whether a
# re-import is needed.
set -euo pipefail

die() {
    echo "build-images: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || die "usage: $0 OUT_DIR"
OUT_DIR=$1

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
[[ -f "$ROOT/Cargo.toml" ]] || die "workspace root not found at $ROOT"

BUSYBOX=${BUSYBOX:-/bin/busybox}
IPERF3=${IPERF3:-/usr/bin/iperf3}
[[ -x "$BUSYBOX" ]] || die "busybox not found at $BUSYBOX (apt-get install busybox-static)"
[[ -x "$IPERF3" ]] || die "iperf3 not found at $IPERF3 (apt-get install iperf3)"
# A dynamically linked busybox would need its libraries too; only the static
# one is handled.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi

# Fixed permissions regardless of the caller's umask, for reproducible tars.
umask 022

echo "build-images: cargo build --release -p workloads" >&2
(cd "$ROOT" && cargo build --release -p workloads) || die "cargo build failed"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RELEASE="$TARGET_DIR/release"

mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Copies an ELF binary to DEST inside ROOTFS, plus every library ldd reports,
# at the same path as on the host (the dynamic loader looks there).
add_elf() {
    local rootfs=$1 src=$2 dest=$3 out lib
    [[ -f "$src" ]] || die "missing binary $src"
    install -D -m 755 "$src" "$rootfs$dest"
    out=$(ldd "$src") || die "ldd failed for $src"
    if printf '%s\n' "$out" | grep -q 'not found'; then
        die "ldd reports missing libraries for $src: $(printf '%s\n' "$out" | grep 'not found' | tr -s ' \t\n' ' ')"
    fi
    # Lines look like "libc.so.6 => /lib/.../libc.so.6 (0x...)" or
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no path.
    while read -r lib; do
        [[ -n "$lib" ]] || continue
        [[ -f "$lib" ]] || die "library $lib (needed by $src) not found"
        # -L: store the real file under the name that is looked up, so no
        # host-specific symlink layout (merged /usr) leaks into the image.
        if [[ ! -e "$rootfs$lib" ]]; then
            mkdir -p "$rootfs$(dirname "$lib")"
            cp -L "$lib" "$rootfs$lib"
            chmod 755 "$rootfs$lib"
        fi
    done < <(printf '%s\n' "$out" | awk '$2 == "=>" && $3 ~ /^\// { print $3; next }
        $1 ~ /^\// { print $1 }')
}

# Base rootfs: busybox with its applet links (so `podman exec X sh` works),
# and the few files tools and podman expect.
make_base() {
    local rootfs=$1 applet
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev}
    install -d -m 1777 "$rootfs/tmp"
    chmod 700 "$rootfs/root"
    install -m 755 "$BUSYBOX" "$rootfs/bin/busybox"
    while read -r applet; do
        # Skip entries outside a bin directory (e.g. "linuxrc").
        [[ "$applet" == */* ]] || continue
        [[ -e "$rootfs/$applet" ]] || ln -s /bin/busybox "$rootfs/$applet"
    done < <("$BUSYBOX" --list-full)
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$rootfs/etc/group"
}

# Packs ROOTFS into OUT_DIR/NAME.tar, replacing it only if the bytes differ.
pack() {
    local name=$1 rootfs=$2 tmp="$WORK/$1.tar" dest="$OUT_DIR/$1.tar"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --format=gnu -C "$rootfs" -cf "$tmp" . || die "tar failed for $name"
    if [[ -f "$dest" ]] && cmp -s "$tmp" "$dest"; then
        echo "build-images: $dest up to date" >&2
    else
        mv "$tmp" "$dest" || die "cannot write $dest"
        echo "build-images: wrote $dest" >&2
    fi
}

build_image() {
    local name=$1 rootfs="$WORK/$1"
    [[ -f "$SCRIPT_DIR/$name/image.json" ]] || die "missing $SCRIPT_DIR/$name/image.json"
    make_base "$rootfs"
    case "$name" in
    counter)
        install -m 755 "$SCRIPT_DIR/counter/counter.sh" "$rootfs/bin/counter"
        ;;
    tcp-echo | udp-echo | memhog)
        add_elf "$rootfs" "$RELEASE/$name" "/bin/$name"
        ;;
    iperf3)
        add_elf "$rootfs" "$IPERF3" /usr/bin/iperf3
        ;;
    *)
        die "unknown image $name"
        ;;
    esac
    pack "$name" "$rootfs"
}

for image in counter tcp-echo udp-echo iperf3 memhog; do
    build_image "$image"
done
