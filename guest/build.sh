#!/usr/bin/env bash
# Builds the livemig test guest into a cache dir:
#   $LIVEMIG_CACHE/guest  (or $HOME/.cache/livemig/guest)
#     vmlinuz         Debian cloud kernel
#     initramfs.img   busybox-static + guest/init + virtio_blk/ext4 modules + workload (gzip cpio)
#     root.raw        raw ext4 image (~300 MB of real files), mounted read-only by the guest
#     root-1k.raw     the same files on an ext4 with 1 KiB blocks (what mke2fs makes under
#                     512 MB): page-cache pages at 1 KiB offsets of the disk (the VM tests of
#                     disk references at any alignment)
#     root.qcow2      root.raw's content as a qcow2 overlay on root-base.qcow2 (its backing file:
#                     the first half of root.raw, zeros after; the overlay holds the rest)
#     manifest.json   kernel package/version, file sizes, hash of the build inputs
# Idempotent: every layer has a stamp holding the hash of its inputs (including the text of
# the shell function that builds it); unchanged inputs -> nothing is rebuilt.
#
# Environment:
#   LIVEMIG_CACHE            cache root (default $HOME/.cache/livemig)
#   LIVEMIG_KERNEL_VERSION   kernel version to use, e.g. 6.12.117+deb12-cloud-amd64
#   LIVEMIG_KERNEL_REFRESH=1 look for a newer kernel package even if one is cached
#   LIVEMIG_ROOT_BUDGET_MIB  approximate size of the files in root.raw (default 300)
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
if [ -n "${LIVEMIG_CACHE:-}" ]; then
    CACHE="$LIVEMIG_CACHE/guest"
else
    CACHE="$HOME/.cache/livemig/guest"
fi
ROOT_BUDGET_MIB=${LIVEMIG_ROOT_BUDGET_MIB:-300}
# iproute2 (ip, tc): for `livemig-dev bench` and the KVM lane's L1 host (lane/build.sh). qemu-utils
# (qemu-img): the VM tests' qcow2 data disks.
# QEMU comes from guest/qemu.sh: QEMU >= 9.0 as the system's, QEMU 7.2 beside it.
PACKAGES=(busybox-static cpio e2fsprogs kmod xz-utils iproute2 qemu-utils)
# Modules the guest needs (dependencies and soft dependencies are resolved by kmod from
# modules.dep/modules.softdep; crc32c is listed explicitly because ext4 with metadata_csum
# needs it and it is only a soft dependency).
WANTED_MODULES=(virtio_pci virtio_blk crc32c libcrc32c ext4)

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
sha() { sha256sum | cut -c1-64; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
is_static() {
    local out
    out=$(ldd "$1" 2>&1 || true)
    grep -qE 'not a dynamic executable|statically linked' <<<"$out"
}

# shellcheck source=guest/modules.sh
. "$SCRIPT_DIR/modules.sh"
# shellcheck source=guest/qemu.sh
. "$SCRIPT_DIR/qemu.sh"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
ensure_packages() {
    local missing=() p st
    for p in "${PACKAGES[@]}"; do
        st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [ "$st" = installed ] || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        local sudo=()
        [ "$(id -u)" = 0 ] || sudo=(sudo)
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get update -q
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
}

# ---------------------------------------------------------------------------------------------
# Sets KVER (e.g. 6.12.117+deb12-cloud-amd64).
choose_kernel() {
    if [ -n "${LIVEMIG_KERNEL_VERSION:-}" ]; then
        KVER=$LIVEMIG_KERNEL_VERSION
    elif [ "${LIVEMIG_KERNEL_REFRESH:-0}" != 1 ] && [ -f "$CACHE/kernel/current" ] \
        && [ -f "$CACHE/kernel/$(cat "$CACHE/kernel/current")/stamp" ]; then
        KVER=$(cat "$CACHE/kernel/current")
    else
        local list
        list=$(apt-cache search --names-only '^linux-image-.*-cloud-amd64(-unsigned)?$' \
            | awk '{print $1}' | sed -E 's/^linux-image-(.*-cloud-amd64)(-unsigned)?$/\1/' \
            | grep -v '^cloud-amd64$' | sort -uV || true)
        if [ -z "$list" ]; then
            log "no cloud kernel in the apt lists, running apt-get update"
            DEBIAN_FRONTEND=noninteractive apt-get update -q
            list=$(apt-cache search --names-only '^linux-image-.*-cloud-amd64(-unsigned)?$' \
                | awk '{print $1}' | sed -E 's/^linux-image-(.*-cloud-amd64)(-unsigned)?$/\1/' \
                | grep -v '^cloud-amd64$' | sort -uV || true)
        fi
        [ -n "$list" ] || die "no linux-image-*-cloud-amd64 package found with apt-cache"
        KVER=$(echo "$list" | tail -1)
    fi
}

# Downloads and unpacks the kernel package into $CACHE/kernel/$KVER/tree, runs depmod.
build_kernel() {
    local dir="$CACHE/kernel/$KVER" want
    want=$(printf '%s\n%s\n' "$KVER" "$(declare -f build_kernel)" | sha)
    if stamp_ok "$dir/stamp" "$want" && [ -f "$dir/tree/lib/modules/$KVER/modules.dep" ]; then
        return
    fi
    local KPKG="linux-image-$KVER"
    apt-cache show "$KPKG" >/dev/null 2>&1 || KPKG="linux-image-$KVER-unsigned"
    log "fetching kernel package $KPKG"
    rm -rf "$dir"
    mkdir -p "$dir/deb"
    (cd "$dir/deb" && apt-get download -q -o APT::Sandbox::User=root "$KPKG") \
        || die "apt-get download $KPKG failed"
    dpkg -x "$dir"/deb/*.deb "$dir/tree"
    echo "$(dpkg-deb -f "$dir"/deb/*.deb Package) $(dpkg-deb -f "$dir"/deb/*.deb Version)" >"$dir/package"
    depmod -b "$dir/tree" "$KVER"
    [ -f "$dir/tree/boot/vmlinuz-$KVER" ] || die "no vmlinuz in $KPKG"
    rm -rf "$dir/deb"
    echo "$want" >"$dir/stamp"
    echo "$KVER" >"$CACHE/kernel/current"
}

# ---------------------------------------------------------------------------------------------
workload_inputs_hash() {
    {
        declare -f build_workload
        (cd "$REPO" && find guest/workload -path guest/workload/target -prune -o -type f -print \
            | sort | xargs sha256sum)
        sha256sum "$REPO/Cargo.lock" "$REPO/Cargo.toml" 2>/dev/null || true
    } | sha
}

build_workload() {
    local want="$1" out="$CACHE/workload"
    if stamp_ok "$CACHE/workload.stamp" "$want" && [ -x "$out" ]; then
        return
    fi
    log "building the static workload"
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 \
        CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release -q \
        --manifest-path "$REPO/Cargo.toml" -p livemig-workload \
        --target x86_64-unknown-linux-gnu --target-dir "$CACHE/target"
    local bin="$CACHE/target/x86_64-unknown-linux-gnu/release/workload"
    is_static "$bin" || die "workload binary is not static: $(ldd "$bin" 2>&1 | head -3)"
    cp "$bin" "$out.tmp"
    strip "$out.tmp" 2>/dev/null || true
    mv "$out.tmp" "$out"
    echo "$want" >"$CACHE/workload.stamp"
}

# ---------------------------------------------------------------------------------------------
build_initramfs() {
    local tree="$CACHE/kernel/$KVER/tree" want busybox
    busybox=/bin/busybox
    [ -x "$busybox" ] || die "busybox not found"
    is_static "$busybox" || die "$busybox is not static (install busybox-static)"
    want=$({
        echo "$KVER" "${WANTED_MODULES[*]}"
        declare -f build_initramfs install_modules
        sha256sum "$SCRIPT_DIR/init" "$CACHE/workload" "$busybox" | cut -c1-64
    } | sha)
    if stamp_ok "$CACHE/initramfs.stamp" "$want" && [ -f "$CACHE/initramfs.img" ]; then
        return
    fi
    log "building initramfs.img"
    local st="$CACHE/initramfs.d"
    rm -rf "$st"
    mkdir -p "$st"/{bin,sbin,dev,proc,sys,tmp,run,mnt/root,etc/livemig,lib/modules/"$KVER"}
    cp "$busybox" "$st/bin/busybox"
    local a
    for a in $("$busybox" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$st/bin/$a"
    done
    install -m 0755 "$SCRIPT_DIR/init" "$st/init"
    install -m 0755 "$CACHE/workload" "$st/bin/workload"

    # The module closure (deps + softdeps, in load order), resolved with kmod.
    install_modules "$tree" "$KVER" "$st" "$st/etc/livemig/modules" "${WANTED_MODULES[@]}"
    local names=("${MODULE_NAMES[@]}")
    log "initramfs modules: ${names[*]:-(none, all built in)}"

    find "$st" -exec touch -h -d @1700000000 {} +
    (cd "$st" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) \
        | gzip -n -6 >"$CACHE/initramfs.img.tmp"
    mv "$CACHE/initramfs.img.tmp" "$CACHE/initramfs.img"
    rm -rf "$st"
    echo "$want" >"$CACHE/initramfs.stamp"
}

# ---------------------------------------------------------------------------------------------
# Host directories copied into root.raw, whole, in this order, while they fit the budget.
ROOT_CANDIDATES=(
    usr/lib/python3.11 usr/lib/python3 usr/share/perl usr/lib/x86_64-linux-gnu/perl
    usr/lib/x86_64-linux-gnu/perl-base usr/share/perl5 usr/share/qemu usr/lib/gcc usr/libexec
    usr/share/doc usr/bin usr/sbin usr/share/locale usr/lib/x86_64-linux-gnu
)

# Prints the selected host dirs (one per line), within the budget after the kernel modules.
select_root_dirs() {
    local budget=$((ROOT_BUDGET_MIB * 1048576)) used d sz
    used=$(du -sb "$CACHE/kernel/$KVER/tree/lib/modules" | awk '{print $1 * 5}') # ~xz ratio
    for d in "${ROOT_CANDIDATES[@]}"; do
        [ -d "/$d" ] || continue
        sz=$(cd / && find "$d" -name __pycache__ -prune -o -type f -printf '%s\n' 2>/dev/null \
            | awk '{s += $1} END {print s + 0}')
        if [ $((used + sz)) -le "$budget" ]; then
            echo "$d"
            used=$((used + sz))
        fi
    done
}

root_inputs_hash() {
    {
        echo "$KVER" "$ROOT_BUDGET_MIB"
        declare -f build_root select_root_dirs
        printf '%s\n' "$@"
        if [ $# -gt 0 ]; then
            (cd / && { find "$@" -name __pycache__ -prune -o \( -type f -o -type d -o -type l \) \
                -printf '%s %T@ %p\n' 2>/dev/null || true; } | sort)
        fi
    } | sha
}

build_root() {
    local want="$1"; shift
    if stamp_ok "$CACHE/root.stamp" "$want" && [ -f "$CACHE/root.raw" ]; then
        return
    fi
    log "building root.raw from the kernel modules and: $*"
    local st="$CACHE/root.d"
    rm -rf "$st"
    mkdir -p "$st/lib/modules"
    # Kernel modules, decompressed (deterministic for a kernel version).
    local tree="$CACHE/kernel/$KVER/tree"
    (cd "$tree/lib/modules" && find . \( -type f -o -type d -o -type l \) -print0 \
        | cpio -0 -pdm --quiet "$st/lib/modules")
    find "$st/lib/modules" -name '*.ko.xz' -print0 | xargs -0 -r -n 64 -P 2 xz -d
    # Host directories (regular files, dirs and symlinks only; no sockets/devices/fifos).
    if [ $# -gt 0 ]; then
        (cd / && find "$@" -name __pycache__ -prune -o \( -type f -o -type d -o -type l \) \
            -print0 2>/dev/null | cpio -0 -pdm --quiet "$st") || true
    fi
    # Fixed mtimes (ctimes still differ between builds, so the image is not bit-identical).
    find "$st" -exec touch -h -d @1700000000 {} +
    local bytes files size_mib
    bytes=$(du -sb "$st" | awk '{print $1}')
    files=$(find "$st" | wc -l)
    size_mib=$(( bytes * 115 / 100 / 1048576 + 48 ))
    rm -f "$CACHE/root.raw.tmp"
    E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -T default -b 4096 \
        -N $(( files * 5 / 4 + 1024 )) -L livemig-root \
        -U 6c6d6967-0000-4000-8000-726f6f746673 \
        -E root_owner=0:0,hash_seed=6c6d6967-0000-4000-8000-686173680000 \
        -d "$st" "$CACHE/root.raw.tmp" "${size_mib}M" >/dev/null
    mv "$CACHE/root.raw.tmp" "$CACHE/root.raw"
    echo "root_files_bytes=$bytes root_files=$files image_mib=$size_mib dirs=$*" >"$CACHE/root.info"
    rm -rf "$st"
    echo "$want" >"$CACHE/root.stamp"
}

# root-1k.raw: root.raw's files (debugfs rdump, no mount) on an ext4 of the same size with
# 1 KiB blocks, `-T small` as mke2fs chooses under 512 MB.
build_root_1k() {
    local want
    want=$({ cat "$CACHE/root.stamp"; declare -f build_root_1k; } | sha)
    if stamp_ok "$CACHE/root-1k.stamp" "$want" && [ -f "$CACHE/root-1k.raw" ]; then
        return
    fi
    log "building root-1k.raw (1 KiB blocks) from root.raw's files"
    local st="$CACHE/root-1k.d" size
    rm -rf "$st" "$CACHE/root-1k.raw.tmp"
    mkdir -p "$st"
    debugfs -R "rdump / $st" "$CACHE/root.raw" >/dev/null 2>&1 || die "debugfs rdump of root.raw failed"
    [ -d "$st/lib/modules" ] || die "debugfs rdump of root.raw left no lib/modules in $st"
    rm -rf "$st/lost+found"
    find "$st" -exec touch -h -d @1700000000 {} +
    size=$(stat -c %s "$CACHE/root.raw")
    E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -T small -b 1024 -L livemig-root \
        -U 6c6d6967-0000-4000-8000-726f6f74316b \
        -E root_owner=0:0,hash_seed=6c6d6967-0000-4000-8000-686173680000 \
        -d "$st" "$CACHE/root-1k.raw.tmp" "$((size / 1024))k" >/dev/null
    mv "$CACHE/root-1k.raw.tmp" "$CACHE/root-1k.raw"
    rm -rf "$st"
    echo "$want" >"$CACHE/root-1k.stamp"
}

# root.qcow2 over root-base.qcow2: the guest sees root.raw. The base holds root.raw's first half
# (zeros after); an overlay of root.raw's content rebased onto it gets the clusters that differ.
build_root_qcow2() {
    local want
    want=$({ cat "$CACHE/root.stamp"; declare -f build_root_qcow2; } | sha)
    if stamp_ok "$CACHE/root-qcow2.stamp" "$want" && [ -f "$CACHE/root.qcow2" ] && [ -f "$CACHE/root-base.qcow2" ]; then
        return
    fi
    log "building root.qcow2 over root-base.qcow2 from root.raw"
    local size
    size=$(stat -c %s "$CACHE/root.raw")
    rm -f "$CACHE"/root.qcow2 "$CACHE"/root-base.qcow2 "$CACHE"/root-qcow2.*.tmp
    cp --sparse=always "$CACHE/root.raw" "$CACHE/root-qcow2.half.tmp"
    truncate -s $((size / 2)) "$CACHE/root-qcow2.half.tmp"
    truncate -s "$size" "$CACHE/root-qcow2.half.tmp"
    (
        cd "$CACHE"
        qemu-img convert -q -f raw -O qcow2 root-qcow2.half.tmp root-base.qcow2
        qemu-img convert -q -f raw -O qcow2 root.raw root-qcow2.full.tmp
        qemu-img create -q -f qcow2 -b root-qcow2.full.tmp -F qcow2 root-qcow2.top.tmp
        # Relative backing names: the cache directory can move.
        qemu-img rebase -q -f qcow2 -b root-base.qcow2 -F qcow2 root-qcow2.top.tmp
        rm -f root-qcow2.half.tmp root-qcow2.full.tmp
        mv root-qcow2.top.tmp root.qcow2
    )
    echo "$want" >"$CACHE/root-qcow2.stamp"
}

# ---------------------------------------------------------------------------------------------
write_manifest() {
    local inputs="$1" root_dirs="$2" pkg
    pkg=$(cat "$CACHE/kernel/$KVER/package" 2>/dev/null || echo "linux-image-$KVER unknown")
    local sz_k sz_i sz_r
    sz_k=$(stat -c %s "$CACHE/vmlinuz")
    sz_i=$(stat -c %s "$CACHE/initramfs.img")
    sz_r=$(stat -c %s "$CACHE/root.raw")
    cat >"$CACHE/manifest.json.tmp" <<EOF
{
  "kernel_package": "$(echo "$pkg" | awk '{print $1}')",
  "kernel_package_version": "$(echo "$pkg" | awk '{print $2}')",
  "kernel_version": "$KVER",
  "inputs_hash": "$inputs",
  "files": {
    "vmlinuz": $sz_k,
    "initramfs.img": $sz_i,
    "root.raw": $sz_r
  },
  "stamps": {
    "workload": "$(cat "$CACHE/workload.stamp")",
    "initramfs": "$(cat "$CACHE/initramfs.stamp")",
    "root": "$(cat "$CACHE/root.stamp")"
  },
  "root_info": "$(cat "$CACHE/root.info" 2>/dev/null || true)",
  "root_dirs": "$root_dirs"
}
EOF
    mv "$CACHE/manifest.json.tmp" "$CACHE/manifest.json"
}

# Hash of everything the guest is built from: kernel version, this script, init, and the
# workload ($1) and root-disk ($2) input hashes.
inputs_hash() {
    {
        echo "$KVER"
        sha256sum "$SCRIPT_DIR/build.sh" "$SCRIPT_DIR/init" "$SCRIPT_DIR/modules.sh" | cut -c1-64
        echo "$1" "$2"
    } | sha
}

main() {
    local t0=$SECONDS
    ensure_packages
    ensure_qemu_current
    ensure_qemu_7_2 "$(dirname "$CACHE")/qemu-7.2"
    choose_kernel
    local wl_hash root_dirs root_hash inputs
    wl_hash=$(workload_inputs_hash)
    mapfile -t root_dirs < <(if [ -f "$CACHE/kernel/$KVER/stamp" ]; then select_root_dirs; fi)
    root_hash=$(root_inputs_hash "${root_dirs[@]}")
    inputs=$(inputs_hash "$wl_hash" "$root_hash")
    if [ -f "$CACHE/manifest.json" ] && grep -q "\"inputs_hash\": \"$inputs\"" "$CACHE/manifest.json" \
        && [ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initramfs.img" ] && [ -f "$CACHE/root.raw" ] \
        && [ -f "$CACHE/root-1k.raw" ] && [ -f "$CACHE/root.qcow2" ]; then
        log "guest is up to date ($CACHE, kernel $KVER)"
        return
    fi
    build_kernel
    if [ ${#root_dirs[@]} -eq 0 ]; then
        # First build: the module tree exists only now.
        mapfile -t root_dirs < <(select_root_dirs)
        root_hash=$(root_inputs_hash "${root_dirs[@]}")
        inputs=$(inputs_hash "$wl_hash" "$root_hash")
    fi
    cp "$CACHE/kernel/$KVER/tree/boot/vmlinuz-$KVER" "$CACHE/vmlinuz.tmp"
    mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
    build_workload "$wl_hash"
    build_initramfs
    build_root "$root_hash" "${root_dirs[@]}"
    build_root_1k
    build_root_qcow2
    write_manifest "$inputs" "${root_dirs[*]}"
    log "guest built in $((SECONDS - t0)) s: $CACHE"
}

main "$@"
