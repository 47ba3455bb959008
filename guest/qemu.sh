# shellcheck shell=bash
# QEMU for the tests, sourced by guest/build.sh (needs its log, die, sha, stamp_ok):
#   ensure_qemu_current   the system's qemu-system-x86_64 is QEMU >= 9.0 (QEMU's own dirty tracking
#                         is correct under TCG only from 9.0): on Debian bookworm it comes from
#                         bookworm-backports (10.0.x), which this adds to apt's sources if missing
#   ensure_qemu_7_2 DIR   QEMU 7.2 (Debian bookworm's packages) unpacked beside it into DIR, run by
#                         the wrapper DIR/qemu-system-x86_64 (firmware and modules from DIR)

qemu_major() { "$1" --version 2>/dev/null | sed -nE '1s/.*version ([0-9]+)\..*/\1/p'; }

apt_as_root() {
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" "$@"
}

ensure_qemu_current() {
    local major codename
    major=$(qemu_major qemu-system-x86_64 || true)
    if [ -n "$major" ] && [ "$major" -ge 9 ]; then
        return
    fi
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$codename" = bookworm ]; then
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            log "adding Debian bookworm-backports to apt's sources (QEMU 10)"
            printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
                'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
                | apt_as_root tee /etc/apt/sources.list.d/livemig-bookworm-backports.sources >/dev/null
        fi
        log "installing QEMU 10 from bookworm-backports (found: ${major:-none})"
        apt_as_root apt-get update -q
        apt_as_root apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
    else
        log "installing qemu-system-x86 (found: ${major:-none})"
        apt_as_root apt-get update -q
        apt_as_root apt-get install -y -q --no-install-recommends qemu-system-x86
    fi
    major=$(qemu_major qemu-system-x86_64 || true)
    [ -n "$major" ] && [ "$major" -ge 9 ] || die "qemu-system-x86_64 is QEMU ${major:-missing} after the install; livemig's tests need QEMU >= 9.0"
}

# The version of PKG in Debian bookworm's own suites (not -backports), e.g. 1:7.2+dfsg-7+deb12u18+b3.
bookworm_version() {
    apt-cache madison "$1" | awk -F' [|] ' '$3 ~ /bookworm(-updates|-security)?\/main/ && $3 !~ /backports/ {print $2}' \
        | sort -V | tail -1 | tr -d ' '
}

ensure_qemu_7_2() {
    local dir="$1" want p v
    want=$(declare -f ensure_qemu_7_2 bookworm_version | sha)
    if stamp_ok "$dir/stamp" "$want" && [ -x "$dir/qemu-system-x86_64" ]; then
        return
    fi
    log "unpacking QEMU 7.2 (Debian bookworm) into $dir"
    rm -rf "$dir"
    mkdir -p "$dir/deb"
    for p in qemu-system-x86 qemu-system-common qemu-system-data seabios; do
        v=$(bookworm_version "$p")
        if [ -z "$v" ]; then
            apt_as_root apt-get update -q
            v=$(bookworm_version "$p")
        fi
        [ -n "$v" ] || die "no bookworm version of $p in apt's lists"
        (cd "$dir/deb" && apt-get download -q -o APT::Sandbox::User=root "$p=$v") || die "apt-get download $p=$v failed"
    done
    for p in "$dir"/deb/*.deb; do dpkg -x "$p" "$dir/root"; done
    rm -rf "$dir/deb"
    local missing
    missing=$(ldd "$dir/root/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
    [ -z "$missing" ] || die "QEMU 7.2 lacks libraries (install them with apt-get): $missing"
    cat >"$dir/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU 7.2 from Debian bookworm, unpacked by guest/build.sh (guest/qemu.sh); exec keeps the pid.
QEMU_MODULE_DIR='$dir/root/usr/lib/x86_64-linux-gnu/qemu' exec '$dir/root/usr/bin/qemu-system-x86_64' \\
    -L '$dir/root/usr/share/qemu' -L '$dir/root/usr/share/seabios' "\$@"
WRAP
    chmod +x "$dir/qemu-system-x86_64"
    [ "$(qemu_major "$dir/qemu-system-x86_64")" = 7 ] || die "$dir/qemu-system-x86_64 is not QEMU 7: $("$dir/qemu-system-x86_64" --version 2>&1 | head -1)"
    echo "$want" >"$dir/stamp"
}
