# The KVM lane's tests (a job for lane/run, run inside L1 with real KVM): the end-to-end
# migration of a writing guest (the guest's own verifier must find 0 bad pages, the sender's
# digest must match the destination's) with each tracker of the shared engine, and with the
# stream engine (QEMU's own dirty tracking: KVM's dirty log), on the same KVM guest.
# The guest rewrites 64 MiB at 4 MiB/s and the maximum downtime is 10 s: livemig and QEMU run in
# L1, whose code is emulated (TCG) and moves only 2-5 MiB/s of migration there on this machine
# (lane/README.md), while the L2 guest runs at KVM speed; the tests check correctness on KVM
# (digests, the guest's verifier, no oops), not speed. Writes $LANE_OUT/<run>.json (the demo's
# report), <run>.log, <run>.svg, <run>.top (what took L1's CPUs, every 5 s), both QEMUs' logs and
# <run>-destination.console.log; a failed run prints both QEMUs' logs and both guests' consoles.
# Arguments: the runs, in order: a tracker name (soft-dirty, content: the shared engine) or
# `stream` (the stream engine) (default: content stream; soft-dirty is experimental and runs
# only when named: lane/README.md); a run named again runs again
# and its files get a suffix (content.2.json ...), so
# `lane/run lane/tests.sh soft-dirty content soft-dirty content soft-dirty content` compares them.
[ $# -gt 0 ] || set -- content stream
rc=0
seen=" "
for tracker in "$@"; do
    n=$(echo "$seen" | tr ' ' '\n' | grep -cx "$tracker")
    seen="$seen$tracker "
    if [ "$n" = 0 ]; then t=$tracker; else t="$tracker.$((n + 1))"; fi
    echo "LANE-TEST start tracker=$tracker run=$t"
    # (busybox sh: no arrays; $how is split on purpose)
    if [ "$tracker" = stream ]; then how="--engine stream"; else how="--engine shared --tracker $tracker"; fi
    free -m
    # What takes L1's CPUs and memory during the run (lane/README.md: the 2026-11-30 slowness).
    (while sleep 5; do date +%T; free -m | sed -n 2p; top -b -n1 | sed -n 1,14p; done) >"$LANE_OUT/$t.top" 2>&1 &
    sampler=$!
    livemig-dev demo --scenario dirty --rate 4 --max-downtime 10s --mem-mib 256 $how \
        --workdir "/tmp/demo-$t" --report "$LANE_OUT/$t.json" >"$LANE_OUT/$t.log" 2>&1
    r=$?
    # An L2 guest that never booted (its QEMU exited before the workload started: L1 is emulated
    # and not always stable, lane/README.md) says nothing about migration: once more, said.
    if [ $r != 0 ] && grep -q "did not start its workload" "$LANE_OUT/$t.log"; then
        echo "LANE-RETRY tracker=$t: the L2 guest did not boot (before any migration); running it once more"
        cat "$LANE_OUT/$t.log"
        rm -rf "/tmp/demo-$t"
        livemig-dev demo --scenario dirty --rate 4 --max-downtime 10s --mem-mib 256 $how \
            --workdir "/tmp/demo-$t" --report "$LANE_OUT/$t.json" >"$LANE_OUT/$t.log" 2>&1
        r=$?
    fi
    # A source guest whose kernel crashed during the migration (its QEMU then exits: -no-reboot,
    # panic=-1) failed on L1's emulated KVM, not in livemig, which does not touch the source
    # guest's memory: its console says so; once more, said.
    if [ $r != 0 ] && grep -qE 'Kernel panic|BUG:|Oops|general protection fault' "/tmp/demo-$t/source.console.log" 2>/dev/null; then
        echo "LANE-RETRY tracker=$t: the source guest's kernel crashed during the run (its console follows); running it once more"
        cat "$LANE_OUT/$t.log"
        tail -40 "/tmp/demo-$t/source.console.log"
        rm -rf "/tmp/demo-$t"
        livemig-dev demo --scenario dirty --rate 4 --max-downtime 10s --mem-mib 256 $how \
            --workdir "/tmp/demo-$t" --report "$LANE_OUT/$t.json" >"$LANE_OUT/$t.log" 2>&1
        r=$?
    fi
    # A source QEMU that went away before any switchover, its guest's console showing nothing
    # wrong (a reset under -no-reboot exits QEMU quietly: seen on 2026-12-06 with the stream
    # engine and 2026-12-07 with the content tracker, in iteration 0, while livemig only read the
    # guest's memory), failed in L1, not in livemig: once more, said.
    if [ $r != 0 ] && grep -q "the source QEMU is gone" "$LANE_OUT/$t.log" && ! grep -q "switchover: pausing\|releasing the switchover-ack" "$LANE_OUT/$t.log"; then
        echo "LANE-RETRY tracker=$t: the source QEMU went away before the switchover (its log and console follow); running it once more"
        cat "$LANE_OUT/$t.log"
        tail -5 "/tmp/demo-$t/source.qemu.log" "/tmp/demo-$t/source.console.log" 2>/dev/null
        rm -rf "/tmp/demo-$t"
        livemig-dev demo --scenario dirty --rate 4 --max-downtime 10s --mem-mib 256 $how \
            --workdir "/tmp/demo-$t" --report "$LANE_OUT/$t.json" >"$LANE_OUT/$t.log" 2>&1
        r=$?
    fi
    kill $sampler 2>/dev/null
    cat "$LANE_OUT/$t.log"
    echo "LANE-TEST end tracker=$t rc=$r"
    [ $r = 0 ] || rc=1
    cp "/tmp/demo-$t/send.svg" "$LANE_OUT/$t.svg" 2>/dev/null || true
    # A destination kernel that oopsed after the verifier passes is a failure too.
    sleep 3
    cp "/tmp/demo-$t/destination.console.log" "$LANE_OUT/$t-destination.console.log" 2>/dev/null || true
    for f in source.qemu.log destination.qemu.log; do cp "/tmp/demo-$t/$f" "$LANE_OUT/$t-$f" 2>/dev/null || true; done
    if [ $r != 0 ]; then
        # Why a QEMU went away is in its own log: on the console, so a failed test shows it.
        echo "--- $t: the guest's modules (where its code is)"
        grep LIVEMIG-MODULE "/tmp/demo-$t/source.console.log" 2>/dev/null
        for f in source.qemu.log destination.qemu.log source.console.log destination.console.log; do
            echo "--- $t: $f (last 30 lines)"
            tail -30 "/tmp/demo-$t/$f" 2>/dev/null
        done
        dmesg | tail -40
    fi
    if grep -qE 'BUG:|Oops|Kernel panic|soft lockup' "/tmp/demo-$t/destination.console.log"; then
        echo "LANE-TEST tracker=$t: the destination kernel oopsed"
        rc=1
    fi
    rm -rf "/tmp/demo-$t"
done
exit $rc
