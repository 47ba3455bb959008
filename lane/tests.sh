# The KVM lane's tests (a job for lane/run, run inside L1 with real KVM): the end-to-end
# migration of a writing guest (the guest's own verifier must find 0 bad pages, the sender's
# digest must match the destination's) with each tracker of the shared engine, and with the
# stream engine (QEMU's own dirty tracking: KVM's dirty log), on the same KVM guest.
# The guest rewrites 64 MiB at 4 MiB/s and the maximum downtime is 3 s: livemig itself runs in
# L1, which is emulated (TCG); since 2026-11-30 its pipeline moves only ~5 MiB/s there (it was
# 1 s while hashing 256 MiB took about 250 ms; see lane/README.md), the L2 guest runs at KVM speed.
# The tests check correctness on KVM (digests, the guest's verifier, no oops), not speed. Writes $LANE_OUT/<tracker>.json (the demo's report), <tracker>.log, <tracker>.svg,
# and <tracker>-destination.console.log.
# Arguments: the runs, in order: a tracker name (soft-dirty, content: the shared engine) or
# `stream` (the stream engine; not in the default set yet: in the emulated L1 the relay moved only
# ~1.3 MiB/s and the hot guest never converged, see lane/README.md) (default: soft-dirty
# content); a run named again
# runs again and its files get a suffix (content.2.json ...), so
# `lane/run lane/tests.sh soft-dirty content soft-dirty content soft-dirty content` compares them.
[ $# -gt 0 ] || set -- soft-dirty content
rc=0
seen=" "
for tracker in "$@"; do
    n=$(echo "$seen" | tr ' ' '\n' | grep -cx "$tracker")
    seen="$seen$tracker "
    if [ "$n" = 0 ]; then t=$tracker; else t="$tracker.$((n + 1))"; fi
    echo "LANE-TEST start tracker=$tracker run=$t"
    # (busybox sh: no arrays; $how is split on purpose)
    if [ "$tracker" = stream ]; then how="--engine stream"; else how="--engine shared --tracker $tracker"; fi
    livemig demo --scenario dirty --rate 4 --max-downtime 3s --mem-mib 256 $how \
        --workdir "/tmp/demo-$t" --report "$LANE_OUT/$t.json" >"$LANE_OUT/$t.log" 2>&1
    r=$?
    cat "$LANE_OUT/$t.log"
    echo "LANE-TEST end tracker=$t rc=$r"
    [ $r = 0 ] || rc=1
    cp "/tmp/demo-$t/send.svg" "$LANE_OUT/$t.svg" 2>/dev/null || true
    # A destination kernel that oopsed after the verifier passes is a failure too.
    sleep 3
    cp "/tmp/demo-$t/destination.console.log" "$LANE_OUT/$t-destination.console.log" 2>/dev/null || true
    for f in source.qemu.log destination.qemu.log; do cp "/tmp/demo-$t/$f" "$LANE_OUT/$t-$f" 2>/dev/null || true; done
    [ $r = 0 ] || dmesg | tail -40
    if grep -qE 'BUG:|Oops|Kernel panic|soft lockup' "/tmp/demo-$t/destination.console.log"; then
        echo "LANE-TEST tracker=$t: the destination kernel oopsed"
        rc=1
    fi
    rm -rf "/tmp/demo-$t"
done
exit $rc
