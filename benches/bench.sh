#!/usr/bin/env bash
# vmdepot against its peers on the same Debian disk images (fixtures/):
#   A   debootstrap minbase in a fresh ext4
#   B   A changed in place (packages added, files edited)
#   B2  B's files re-laid by a fresh mkfs.ext4
# For each tool: ingest time of A, then B, then B2; store size (du -sb)
# after each; re-ingest of an unchanged A; export (restore) time of A
# (median of 3 runs); peak RSS over all its runs; allocated bytes of the
# exported A (sparseness).
# Page cache is warm for every tool alike (the images are read once first).
#
# Usage: benches/bench.sh [SIZE] [OUT.md]    (SIZE 2G by default, as in the issue)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
out_md=${2:-}
bash .ci/setup >/dev/null
cargo build --release -q
vmdepot=$PWD/target/release/vmdepot
img=$(bash fixtures/build-disk-images.sh "$size")
work=$(mktemp -d /var/tmp/vmdepot-bench.XXXXXX)
# QEMUs started by the launch section are found by their pid files.
killvms() { for f in $(find "$work" -name '*.pid' 2>/dev/null); do kill -9 "$(cat "$f")" 2>/dev/null || true; done; }
trap 'killvms; rm -rf "$work"' EXIT
cat "$img"/A.raw "$img"/B.raw "$img"/B2.raw >/dev/null
# Let writeback and discards of earlier work settle: the first runs after a
# large delete were measured up to 3x slower on this machine (ext4, discard).
sync
sleep 5

declare -A R   # R[tool,metric]
tools=()

# measure TOOL METRIC CMD...: wall seconds into R[TOOL,METRIC], peak RSS tracked.
measure() {
    local tool=$1 metric=$2; shift 2
    local t0 t1
    /usr/bin/time -f '%M' -o "$work/rss" "$@" >"$work/log" 2>&1 || { echo "bench: $tool $metric failed:" >&2; tail -5 "$work/log" >&2; R[$tool,$metric]=fail; return 0; }
    R[$tool,$metric]=$(awk -v s="$(cat "$work/t")" 'BEGIN{print s}' 2>/dev/null || echo "?")
    local rss; rss=$(tail -1 "$work/rss")
    local prev=${R[$tool,rss]:-0}
    (( rss > prev )) && R[$tool,rss]=$rss || true
}
# timed wrapper: writes elapsed seconds to $work/t
timed() { local s e; s=$(date +%s.%N); "$@"; local rc=$?; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN{printf "%.2f", b-a}' >"$work/t"; return $rc; }
export -f timed
dub() { du -sb "$1" | cut -f1; }
alloc() { echo $(( $(stat -c %b "$1") * 512 )); }

run_tool() {  # run_tool NAME INGEST_FN REINGEST_FN EXPORT_FN STORE_PATH
    local name=$1 ingest=$2 reingest=$3 export=$4 store=$5
    tools+=("$name")
    for i in A B B2; do
        measure "$name" "in_$i" bash -c "timed $ingest $i"
        R[$name,du_$i]=$(dub "$store")
    done
    measure "$name" "re_A" bash -c "timed $reingest A"
    # export: median of three runs
    local ex=()
    for _ in 1 2 3; do
        rm -rf "$work/out.raw" "$work/restore"
        measure "$name" "ex_A" bash -c "timed $export"
        ex+=("${R[$name,ex_A]}")
    done
    R[$name,ex_A]=$(printf '%s\n' "${ex[@]}" | sort -n | sed -n 2p)
    if [ -f "$work/out.raw" ]; then
        R[$name,sparse]=$(alloc "$work/out.raw")
        cmp -s "$work/out.raw" "$img/A.raw" || R[$name,sparse]="DIFFERS"
    else
        R[$name,sparse]="-"
    fi
    rm -rf "$work/out.raw" "$work/restore"
}
export work img vmdepot

# --- vmdepot
mkdir -p "$work/vmdepot"
vd_in() { "$vmdepot" --depot "$work/vmdepot/d" image import "$img/$1.raw" --name "$1" -q >/dev/null; }
vd_re() { "$vmdepot" --depot "$work/vmdepot/d" image import "$img/$1.raw" --name "$1-again" -q >/dev/null; }
vd_ex() { "$vmdepot" --depot "$work/vmdepot/d" image export A "$work/out.raw" -q; }
export -f vd_in vd_re vd_ex
run_tool vmdepot vd_in vd_re vd_ex "$work/vmdepot"

# BENCH_ONLY=vmdepot skips the peers (for quick runs while tuning).
if [ "${BENCH_ONLY:-}" != vmdepot ]; then
# --- borg, fixed 4 MiB and default CDC (repo without encryption, default lz4)
for mode in fixed cdc; do
    repo=$work/borg-$mode
    export BORG_REPO=$repo BORG_BASE_DIR=$work/borg-base-$mode BORG_MODE=$mode
    export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
    borg init -e none "$repo" >/dev/null 2>&1
    borg_in() { cd "$img"; if [ "$BORG_MODE" = fixed ]; then borg create --chunker-params fixed,4194304 --sparse "::$1" "$1.raw"; else borg create "::$1" "$1.raw"; fi; }
    borg_re() { cd "$img"; if [ "$BORG_MODE" = fixed ]; then borg create --chunker-params fixed,4194304 --sparse "::$1-again" "$1.raw"; else borg create "::$1-again" "$1.raw"; fi; }
    borg_ex() { mkdir -p "$work/restore" && cd "$work/restore" && borg extract --sparse ::A && mv A.raw "$work/out.raw"; }
    export -f borg_in borg_re borg_ex
    run_tool "borg ($mode)" borg_in borg_re borg_ex "$repo"
done

# --- restic (repository v2: zstd compression)
export RESTIC_REPOSITORY=$work/restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$work/restic-cache
restic init --repository-version 2 >/dev/null 2>&1
rs_in() { cd "$img"; restic backup --quiet "$1.raw"; }
rs_re() { cd "$img"; restic backup --quiet "$1.raw"; }
rs_ex() { restic restore latest --quiet --target "$work/restore" --include /A.raw 2>/dev/null || true; f=$(find "$work/restore" -name A.raw | head -1); [ -n "$f" ] && mv "$f" "$work/out.raw"; }
export -f rs_in rs_re rs_ex
run_tool "restic" rs_in rs_re rs_ex "$work/restic"

# --- casync (CDC 64 KiB average, zstd)
mkdir -p "$work/casync"
ca_in() { casync make --compression=zstd --store="$work/casync/store" "$work/casync/$1.caibx" "$img/$1.raw" >/dev/null; }
ca_re() { casync make --compression=zstd --store="$work/casync/store" "$work/casync/$1-again.caibx" "$img/$1.raw" >/dev/null; }
ca_ex() { casync extract --store="$work/casync/store" "$work/casync/A.caibx" "$work/out.raw"; }
export -f ca_in ca_re ca_ex
run_tool "casync" ca_in ca_re ca_ex "$work/casync"

# --- zstd -3 -T2, one file per image
mkdir -p "$work/zstd"
zs_in() { zstd -q -3 -T2 -f "$img/$1.raw" -o "$work/zstd/$1.zst"; }
zs_re() { zstd -q -3 -T2 -f "$img/$1.raw" -o "$work/zstd/$1-again.zst"; }
zs_ex() { zstd -q -d --sparse -f "$work/zstd/A.zst" -o "$work/out.raw"; }
export -f zs_in zs_re zs_ex
run_tool "zstd -3 -T2" zs_in zs_re zs_ex "$work/zstd"

# --- qemu-img convert to compressed qcow2, one file per image
mkdir -p "$work/qcow2"
qi_in() { qemu-img convert -c -f raw -O qcow2 "$img/$1.raw" "$work/qcow2/$1.qcow2"; }
qi_re() { qemu-img convert -c -f raw -O qcow2 "$img/$1.raw" "$work/qcow2/$1-again.qcow2"; }
qi_ex() { qemu-img convert -f qcow2 -O raw "$work/qcow2/A.qcow2" "$work/out.raw"; }
export -f qi_in qi_re qi_ex
run_tool "qemu-img convert -c" qi_in qi_re qi_ex "$work/qcow2"

# --- cp --sparse=always: the export baseline
mkdir -p "$work/cp"
cp_in() { cp --sparse=always "$img/$1.raw" "$work/cp/$1.raw"; }
cp_re() { cp --sparse=always "$img/$1.raw" "$work/cp/$1-again.raw"; }
cp_ex() { cp --sparse=always "$work/cp/A.raw" "$work/out.raw"; }
export -f cp_in cp_re cp_ex
run_tool "cp --sparse=always" cp_in cp_re cp_ex "$work/cp"

fi

# --- A thin 1 TiB disk holding image A's data at 500 GiB: cost must follow data, not size.
thin=$work/thin.raw
truncate -s 1T "$thin"
dd if="$img/A.raw" of="$thin" bs=1M seek=512000 conv=notrunc,sparse status=none
declare -A T
tmeasure() {  # tmeasure KEY CMD...
    local key=$1; shift
    /usr/bin/time -f '%e %M' -o "$work/tt" "$@" >"$work/log" 2>&1 || { echo "bench: thin $key failed" >&2; tail -3 "$work/log" >&2; }
    T[$key]=$(awk '{printf "%s s, %.0f MiB", $1, $2/1024}' "$work/tt")
}
tmeasure vd_cold "$vmdepot" --depot "$work/thin-depot" image import "$thin" --name thin -q
tmeasure vd_warm "$vmdepot" --depot "$work/thin-depot" image import "$thin" --name thin2 --reread -q
tmeasure vd_ex "$vmdepot" --depot "$work/thin-depot" image export thin "$work/thin.out" -q
rm -f "$work/thin.out"
tmeasure qi qemu-img convert -f raw -O qcow2 "$thin" "$work/thin.qcow2"
rm -f "$work/thin.qcow2"
tmeasure cp cp --sparse=always "$thin" "$work/thin.out"
rm -f "$work/thin.out" "$thin"

# --- Launch (issue 3): instances of image A, from `instance run` until it
# returns with QEMU running (no guest boot), against doing it by hand:
# qemu-img create -b (overlay on the raw file) + qemu-system-x86_64
# -daemonize with the same devices. TCG, 128 MiB guests.
declare -A L
ld=$work/launch-depot
"$vmdepot" --depot "$ld" image import "$img/A.raw" --name A -q >/dev/null
sync; sleep 2
lrun() { "$vmdepot" --depot "$ld" -q instance run A --memory 128M --accel tcg "$@" >/dev/null; }
inst_alloc() {  # allocated bytes of all instance dirs, per instance
    local n; n=$(ls "$ld/instances" | wc -l)
    echo $(( $(du -sB1 "$ld/instances" | cut -f1) / n ))
}
timed lrun --name one; L[vd1cold]=$(cat "$work/t")
"$vmdepot" --depot "$ld" -q instance delete one --force >/dev/null
timed lrun --name one; L[vd1]=$(cat "$work/t")
L[vd1disk]=$(inst_alloc)
"$vmdepot" --depot "$ld" -q instance delete one --force >/dev/null
timed lrun --name ten --count 10; L[vd10]=$(cat "$work/t")
L[vd10disk]=$(inst_alloc)
running=$("$vmdepot" --depot "$ld" instance list --json | grep -c '"state": "running"')
for i in $(seq 1 10); do "$vmdepot" --depot "$ld" -q instance delete "ten-$i" --force >/dev/null; done
timed lrun --name cp1 --disk copy; L[vdcopy]=$(cat "$work/t")
"$vmdepot" --depot "$ld" -q instance delete cp1 --force >/dev/null
by_hand() {  # by_hand N: N overlays + N QEMUs, as a script would
    local d=$work/hand i
    rm -rf "$d"; mkdir -p "$d"
    for i in $(seq 1 "$1"); do
        qemu-img create -q -f qcow2 -b "$img/A.raw" -F raw "$d/$i.qcow2"
        qemu-system-x86_64 -nodefaults -display none -machine pc -accel tcg -cpu max -m 128M \
            -drive "file=$d/$i.qcow2,format=qcow2,if=virtio" -serial "file:$d/$i.log" \
            -qmp "unix:$d/$i.qmp,server=on,wait=off" -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
            -pidfile "$d/$i.pid" -daemonize
    done
}
timed by_hand 1; L[hand1]=$(cat "$work/t")
L[hand1disk]=$(du -sB1 "$work/hand" | cut -f1)
killvms; sleep 0.5
timed by_hand 10; L[hand10]=$(cat "$work/t")
L[hand10disk]=$(( $(du -sB1 "$work/hand" | cut -f1) / 10 ))
killvms; rm -rf "$work/hand"
timed cp --sparse=always "$img/A.raw" "$work/cp-copy.raw"; L[cpcopy]=$(cat "$work/t")
rm -f "$work/cp-copy.raw"

# --- Capture and copy (issue 4).
declare -A C
cd_=$work/capture-depot
vdc() { "$vmdepot" --depot "$cd_" -q "$@"; }
vdc image import "$img/A.raw" --name A >/dev/null
vdc instance run A --name cap --memory 128M --accel tcg >/dev/null
vdc instance stop cap --force >/dev/null
overlay=$(ls "$cd_"/instances/*/disk.qcow2)
head -c 10M /dev/urandom >"$work/rand10m"
qemu-io -f qcow2 -c "write -q -s $work/rand10m 512M 10M" "$overlay"
stored() { "$vmdepot" --depot "$1" stats --json | awk -F'[:,]' '/"stored_bytes"/{gsub(/ /,"",$2); print $2}'; }
sync; sleep 2
s0=$(stored "$cd_")
timed vdc image create --from-instance cap --name captured; C[vd]=$(cat "$work/t")
C[vdbytes]=$(( $(stored "$cd_") - s0 ))
# the same changed disk as a file, re-imported whole (--reread: really read)
qemu-img convert -f qcow2 -O raw "$overlay" "$work/changed.raw"
s0=$(stored "$cd_")
timed vdc image import "$work/changed.raw" --name reimported --reread; C[re]=$(cat "$work/t")
C[rebytes]=$(( $(stored "$cd_") - s0 ))
vdc instance delete cap >/dev/null
if [ "${BENCH_ONLY:-}" != vmdepot ]; then
    export BORG_REPO=$work/borg-capture BORG_BASE_DIR=$work/borg-base-capture
    borg init -e none "$BORG_REPO" >/dev/null 2>&1
    (cd "$img" && borg create --chunker-params fixed,4194304 --sparse ::A A.raw)
    b0=$(dub "$BORG_REPO")
    timed bash -c "cd '$work' && borg create --chunker-params fixed,4194304 --sparse ::changed changed.raw"; C[borg]=$(cat "$work/t")
    C[borgbytes]=$(( $(dub "$BORG_REPO") - b0 ))
fi
rm -f "$work/changed.raw" "$work/rand10m"
# copies: A to an empty depot, then B to that depot (which holds A)
rd=$work/region2
timed vdc image copy A --to-depot "$rd"; C[copyA]=$(cat "$work/t")
C[copyAbytes]=$(dub "$rd/packs")
vdc image import "$img/B.raw" --name B >/dev/null
sync; sleep 2
timed vdc image copy B --to-depot "$rd"; C[copyB]=$(cat "$work/t")
C[copyBbytes]=$(( $(dub "$rd/packs") - ${C[copyAbytes]} ))

mib() { case $1 in ''|fail|-|DIFFERS) echo "$1";; *) awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}';; esac; }
{
    echo "Images: $size each (A: $(mib "$(alloc "$img/A.raw")") MiB allocated, B: $(mib "$(alloc "$img/B.raw")"), B2: $(mib "$(alloc "$img/B2.raw")")); $(nproc) cores; $(date -u +%Y-%m-%d)."
    echo
    echo "| tool | ingest A s | ingest B s | ingest B2 s | store after A MiB | after A+B MiB | after A+B+B2 MiB | re-ingest A s | export A s | peak RSS MiB | export allocated MiB |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    for t in "${tools[@]}"; do
        echo "| $t | ${R[$t,in_A]} | ${R[$t,in_B]} | ${R[$t,in_B2]} | $(mib "${R[$t,du_A]}") | $(mib "${R[$t,du_B]}") | $(mib "${R[$t,du_B2]}") | ${R[$t,re_A]} | ${R[$t,ex_A]} | $(awk -v k="${R[$t,rss]:-0}" 'BEGIN{printf "%.0f", k/1024}') | $(mib "${R[$t,sparse]}") |"
    done
    v=vmdepot
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "n/a"; else printf "%.2f", a/b }'; }
    echo
    echo "Targets (issue 2), this run:"
    echo "- store after A+B+B2 vs casync: $(ratio "${R[$v,du_B2]}" "${R[casync,du_B2]}")x (target <= 0.8)"
    echo "- store after A vs zstd -3: $(ratio "${R[$v,du_A]}" "${R[zstd -3 -T2,du_A]}")x (target <= 1.1)"
    echo "- ingest A vs borg (fixed): $(ratio "${R[$v,in_A]}" "${R[borg (fixed),in_A]}")x (target <= 0.4)"
    echo "- re-ingest A vs borg (fixed): $(ratio "${R[$v,re_A]}" "${R[borg (fixed),re_A]}")x (target <= 0.15)"
    echo "- export A vs cp --sparse=always: $(ratio "${R[$v,ex_A]}" "${R[cp --sparse=always,ex_A]}")x (target <= 2)"
    echo "- vmdepot peak RSS: $(awk -v k="${R[$v,rss]:-0}" 'BEGIN{printf "%.0f", k/1024}') MiB (target <= 128)"
    echo
    echo "Thin 1 TiB raw disk holding A's data at offset 500 GiB (time, peak RSS):"
    echo
    echo "| operation | result |"
    echo "|---|---|"
    echo "| vmdepot import, new depot (hashes 1 TiB of zeros once) | ${T[vd_cold]} |"
    echo "| vmdepot import again (--reread; zero digests cached) | ${T[vd_warm]} |"
    echo "| vmdepot export | ${T[vd_ex]} |"
    echo "| qemu-img convert -O qcow2 | ${T[qi]} |"
    echo "| cp --sparse=always | ${T[cp]} |"
    kib() { awk -v b="$1" 'BEGIN{printf "%.0f KiB", b/1024}'; }
    echo
    echo "Launch (issue 3): \`instance run\` of image A until QEMU runs (no guest boot; TCG, 128 MiB), against qemu-img create -b plus qemu-system-x86_64 -daemonize by hand:"
    echo
    echo "| launch | vmdepot | by hand |"
    echo "|---|---|---|"
    echo "| 1 instance, base not yet made (materialises A) | ${L[vd1cold]} s | - |"
    echo "| 1 instance | ${L[vd1]} s | ${L[hand1]} s |"
    echo "| 10 instances (--count 10) | ${L[vd10]} s ($running running) | ${L[hand10]} s |"
    echo "| disk added per instance at launch | $(kib "${L[vd10disk]}") | $(kib "${L[hand10disk]}") |"
    echo "| full private copy: --disk copy vs cp --sparse=always | ${L[vdcopy]} s | ${L[cpcopy]} s |"
    echo
    echo "Targets (issue 3): 10 instances in $(echo "${L[vd10]}") s (target <= 2 s); $(kib "${L[vd10disk]}") added each (target <= 1024 KiB)."
    echo
    echo "Capture (issue 4): an instance of A whose disk changed 10 MiB (random data written into its overlay), stopped:"
    echo
    echo "| capture | time s | bytes written to the store |"
    echo "|---|---|---|"
    echo "| vmdepot image create --from-instance | ${C[vd]} | $(kib "${C[vdbytes]}") |"
    echo "| vmdepot import of the whole changed disk (--reread) | ${C[re]} | $(kib "${C[rebytes]}") |"
    echo "| borg create (fixed 4 MiB), A already in the repo | ${C[borg]:--} | $(kib "${C[borgbytes]:-0}") |"
    echo
    echo "Copy between depots (image copy --to-depot):"
    echo
    echo "| copy | time s | pack bytes written in the target |"
    echo "|---|---|---|"
    echo "| A to an empty depot | ${C[copyA]} | $(kib "${C[copyAbytes]}") |"
    echo "| B to a depot that holds A | ${C[copyB]} | $(kib "${C[copyBbytes]}") |"
} | tee "$work/table.md"
if [ -n "$out_md" ]; then
    { echo "# Benchmarks"; echo; echo "Generated by \`benches/bench.sh $size\`; do not edit by hand."; echo; cat "$work/table.md"; } >"$out_md"
fi
