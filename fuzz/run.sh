#!/usr/bin/env bash
# Builds the fuzz targets and runs each for MINUTES (default 10), one after
# the other (one AFL instance at a time: the machine is shared), then
# prints target | execs | time | crashes | hangs. Not run in CI.
#
#   fuzz/run.sh [MINUTES]          every target
#   TARGETS="map pack" fuzz/run.sh 2
#
# Findings: fuzz/out/<target>/default/{crashes,hangs}/. Limits per input:
# 64 MiB of Rust heap (vmdepot_fuzz::LimitAlloc aborts past it), AFL -m
# (address space, which also covers zstd's C allocations) and -t (ms).
set -euo pipefail
MINUTES=${1:-10}
SECS=$(awk -v m="$MINUTES" 'BEGIN { print int(m * 60) }')
MEM_MB=${MEM_MB:-256}
TIMEOUT_MS=${TIMEOUT_MS:-1000}
ALL="source_any source_qcow2 source_vmdk source_vhd map map_body pack"
read -r -a TARGETS <<< "${TARGETS:-$ALL}"
cd "$(dirname "$0")"

# cargo-afl (crates.io) builds AFL++ from the sources it ships; no nightly.
command -v cargo-afl >/dev/null || cargo install cargo-afl --locked
if ! out=$(cargo afl config --build 2>&1); then
    case $out in *"already built"*) ;; *) echo "$out" >&2; exit 1 ;; esac
fi
cargo afl build --release --quiet
[ -d seeds ] || ./seeds.sh

mkdir -p out
SCRATCH=$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/vmdepot-fuzz.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
export VMDEPOT_FUZZ_TMP=$SCRATCH
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_FORKSRV_INIT_TMOUT=10000

for t in "${TARGETS[@]}"; do
    echo "== $t: $MINUTES min (log fuzz/out/$t.log)"
    rm -rf "out/$t"
    # -V: stop after that many seconds; status 0 also when crashes were found.
    cargo afl fuzz -i "seeds/$t" -o "out/$t" -m "$MEM_MB" -t "$TIMEOUT_MS" \
        -V "$SECS" -- "target/release/$t" > "out/$t.log" 2>&1 \
        || echo "   afl-fuzz exited with $? (see out/$t.log)"
done

stat() { sed -n "s/^$2 *: *//p" "out/$1/default/fuzzer_stats" 2>/dev/null | head -1; }
printf '\n| %-12s | %12s | %8s | %7s | %5s |\n' target execs time crashes hangs
printf '|%s|%s|%s|%s|%s|\n' -------------- -------------- ---------- --------- -------
for t in "${TARGETS[@]}"; do
    printf '| %-12s | %12s | %7ss | %7s | %5s |\n' "$t" "$(stat "$t" execs_done)" \
        "$(stat "$t" run_time)" "$(stat "$t" saved_crashes)" "$(stat "$t" saved_hangs)"
done
