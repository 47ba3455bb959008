# The KVM lane's benchmark (a job for lane/run, run inside L1 with real KVM): `livemig-dev bench`
# on L2 KVM guests, where QEMU's native migration is a correct baseline. Arguments go to
# `livemig-dev bench` (default: idle, hot, cache and return at 1gbit, 2 runs each, 256 MiB guests).
# Writes $LANE_OUT/kvm/BENCHMARKS.md, $LANE_OUT/kvm/bench/results.json and plots.
# Timings are nested: livemig and QEMU run in L1, which is emulated (TCG); only L2 is on KVM.
[ $# -gt 0 ] || set -- --scenario idle --scenario hot --scenario cache --scenario return \
    --link 1gbit --runs 2 --mem-mib 256 --cache-mib 160 --timeout 120s
# --no-tls: L1 has no openssl for QEMU's certificates (livemig and QEMU both go plain there).
livemig-dev bench --no-tls "$@" --out "$LANE_OUT/kvm" --workdir /tmp/bench
rc=$?
# The logs of every run (consoles, QEMU's stderr, livemig's output): small, and the only trace of
# a run that failed inside L1.
(cd /tmp/bench && find . -name '*.log' | tar cf - -T - | gzip) >"$LANE_OUT/kvm/logs.tar.gz" 2>/dev/null || true
exit $rc
