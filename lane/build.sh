#!/usr/bin/env bash
# Builds the KVM lane's L1 host image into a cache dir:
#   $LIVEMIG_CACHE/lane  (or $HOME/.cache/livemig/lane)
#     vmlinuz         the test guest's Debian cloud kernel (kvm, kvm-amd, veth, sch_tbf as modules)
#     initramfs.img   gzip newc cpio: busybox-static, lane/init, the modules KVM and the bench
#                     need, qemu-system-x86_64 with its libraries and firmware, iproute2 (ip, tc),
#                     and the L2 test guest's kernel and initramfs (its root disk is attached as
#                     a virtio disk when L1 boots, see lane/run)
#     manifest.json   inputs hash, sizes
# L1 boots under TCG with -cpu max (QEMU emulates AMD SVM with nested paging); inside it, the
# L2 guests run on real KVM (kvm-amd). Everything comes from Debian packages: the kernel package
# (via guest/build.sh) and qemu-system-x86, busybox-static and iproute2, which guest/build.sh
# installs.
# Idempotent: a stamp holds the hash of the inputs; unchanged inputs -> nothing is rebuilt.
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
ROOT=${LIVEMIG_CACHE:-$HOME/.cache/livemig}
GUEST="$ROOT/guest"
CACHE="$ROOT/lane"
# Modules of L1: KVM on AMD SVM, the virtio disks, and what the bench's network namespaces need.
WANTED_MODULES=(kvm_amd virtio_pci virtio_blk veth sch_tbf sch_netem)
# ELF programs copied with their shared libraries (same paths as on this host).
PROGRAMS=(/usr/bin/qemu-system-x86_64 /usr/sbin/ip /usr/sbin/tc)
# Firmware QEMU loads for a q35 guest with -kernel and no display or NIC (Debian's firmware path).
FIRMWARE_DIRS=(/usr/share/qemu /usr/share/seabios)

# shellcheck source=guest/modules.sh
. "$REPO/guest/modules.sh"

log() { echo "lane/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
sha() { sha256sum | cut -c1-64; }

# The shared libraries of an ELF program, and its loader, one path per line.
libs_of() {
    ldd "$1" 2>/dev/null | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | sort -u
}

# Copies a file to the same path under $1, following symlinks (the link's own path is kept too).
copy_into() {
    local st="$1" f="$2"
    mkdir -p "$st$(dirname "$f")"
    cp -L "$f" "$st$f"
    local real
    real=$(readlink -f "$f")
    if [ "$real" != "$f" ] && [ ! -e "$st$real" ]; then
        mkdir -p "$st$(dirname "$real")"
        cp -L "$f" "$st$real"
    fi
}

inputs_hash() {
    {
        declare -f build_image libs_of copy_into install_modules
        printf '%s\n' "${WANTED_MODULES[@]}" "${PROGRAMS[@]}" "${FIRMWARE_DIRS[@]}"
        sha256sum "$SCRIPT_DIR/build.sh" "$SCRIPT_DIR/init" "$GUEST/vmlinuz" "$GUEST/initramfs.img" | cut -c1-64
        local p
        for p in "${PROGRAMS[@]}" /bin/busybox; do
            sha256sum "$p" | cut -c1-64
            libs_of "$p" | xargs -r sha256sum | cut -c1-64
        done
        (cd / && find "${FIRMWARE_DIRS[@]}" -type f -printf '%s %T@ %p\n' | sort)
    } | sha
}

build_image() {
    local want="$1" kver tree st
    kver=$(cat "$GUEST/kernel/current")
    tree="$GUEST/kernel/$kver/tree"
    st="$CACHE/initramfs.d"
    rm -rf "$st"
    mkdir -p "$st"/{bin,sbin,dev,proc,sys,tmp,run,etc/lane,lib/modules/"$kver",lane/guest}
    cp /bin/busybox "$st/bin/busybox"
    local a
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -sf busybox "$st/bin/$a"
    done
    install -m 0755 "$SCRIPT_DIR/init" "$st/init"

    local p l
    for p in "${PROGRAMS[@]}"; do
        copy_into "$st" "$p"
        for l in $(libs_of "$p"); do
            [ -e "$st$l" ] || copy_into "$st" "$l"
        done
    done
    # busybox's ip and tc would shadow iproute2's in /bin: the full ones go first in PATH (init).
    for p in "${FIRMWARE_DIRS[@]}"; do
        mkdir -p "$st$p"
        (cd "$p" && find . -type f -o -type l | cpio -pdmL --quiet "$st$p")
    done

    # Module closure in load order (deps and softdeps), decompressed.
    install_modules "$tree" "$kver" "$st" "$st/etc/lane/modules" "${WANTED_MODULES[@]}"
    local names=("${MODULE_NAMES[@]}")
    [ -n "${names[0]:-}" ] || die "no modules resolved from $tree"
    log "L1 modules: ${names[*]}"

    # The L2 test guest (root.raw is attached to L1 as a disk: it is too big for an initramfs).
    cp "$GUEST/vmlinuz" "$GUEST/initramfs.img" "$GUEST/manifest.json" "$st/lane/guest/"

    find "$st" -exec touch -h -d @1700000000 {} +
    (cd "$st" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) \
        | gzip -n -1 >"$CACHE/initramfs.img.tmp"
    mv "$CACHE/initramfs.img.tmp" "$CACHE/initramfs.img"
    cp "$GUEST/vmlinuz" "$CACHE/vmlinuz"
    rm -rf "$st"
    cat >"$CACHE/manifest.json" <<EOF
{
  "inputs_hash": "$want",
  "kernel_version": "$kver",
  "modules": "${names[*]}",
  "initramfs_bytes": $(stat -c %s "$CACHE/initramfs.img")
}
EOF
}

main() {
    local t0=$SECONDS
    # guest/build.sh installs what both need (QEMU, busybox-static, kmod, iproute2 ...).
    bash "$REPO/guest/build.sh"
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    local want
    want=$(inputs_hash)
    if [ -f "$CACHE/manifest.json" ] && grep -q "\"inputs_hash\": \"$want\"" "$CACHE/manifest.json" \
        && [ -f "$CACHE/initramfs.img" ] && [ -f "$CACHE/vmlinuz" ]; then
        log "L1 image is up to date ($CACHE)"
        return
    fi
    log "building the L1 image"
    build_image "$want"
    log "L1 image built in $((SECONDS - t0)) s: $CACHE ($(stat -c %s "$CACHE/initramfs.img") bytes of initramfs)"
}

main "$@"
