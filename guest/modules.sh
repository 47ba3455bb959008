# Sourced by guest/build.sh and lane/build.sh: copies kernel modules into an initramfs tree.
#
# install_modules TREE KVER STAGE LIST MODULE...
#   Resolves MODULE... with kmod (dependencies and soft dependencies, in load order) in the
#   unpacked kernel package TREE, copies them decompressed into STAGE/lib/modules/KVER, writes
#   their names (load order, one per line) to LIST, and runs depmod on STAGE. Built-in modules
#   are skipped. Sets MODULE_NAMES to the names.
install_modules() {
    local tree=$1 kver=$2 st=$3 list=$4
    shift 4
    local m line ko rel names=()
    for m in "$@"; do
        while read -r line; do
            case "$line" in
                insmod\ *)
                    ko=$(echo "$line" | awk '{print $2}')
                    rel=${ko#"$tree/lib/modules/$kver/"}
                    rel=${rel%.xz}
                    rel=${rel%.zst}
                    if [ ! -f "$st/lib/modules/$kver/$rel" ]; then
                        mkdir -p "$(dirname "$st/lib/modules/$kver/$rel")"
                        case "$ko" in
                            *.xz) xz -dc "$ko" >"$st/lib/modules/$kver/$rel" ;;
                            *.zst) zstd -qdc "$ko" >"$st/lib/modules/$kver/$rel" ;;
                            *) cp "$ko" "$st/lib/modules/$kver/$rel" ;;
                        esac
                        names+=("$(basename "$rel" .ko | tr - _)")
                    fi
                    ;;
            esac
        done < <(modprobe -d "$tree" -S "$kver" --show-depends "$m" 2>/dev/null || true)
    done
    printf '%s\n' "${names[@]}" >"$list"
    cp "$tree/lib/modules/$kver"/modules.{builtin,builtin.modinfo,order} "$st/lib/modules/$kver/" 2>/dev/null || true
    depmod -b "$st" "$kver"
    MODULE_NAMES=("${names[@]}")
}
