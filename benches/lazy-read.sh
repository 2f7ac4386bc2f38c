#!/usr/bin/env bash
# What reading an image through vmdepot's lazy disk server costs, against
# qemu-nbd serving the same image's materialised raw base file (the
# cheapest NBD server of the same bytes) and against `vmdepot image
# export`: on image A of fixtures/build-disk-images.sh.
#   sequential: `qemu-img convert` of the whole export to a file in /dev/shm
#   4 KiB reads: `qemu-img bench` of 20,000 reads of 4 KiB, queue depth 1,
#                spread over the image (step 100 KiB), cold server cache
# Page cache is warm for both (the pack files and the base are read first).
#
# Usage: benches/lazy-read.sh [SIZE] [OUT.md]    (SIZE 2G by default)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
out_md=${2:-}
bash .ci/setup >/dev/null
cargo build --release -q
vmdepot=$PWD/target/release/vmdepot
img=$(bash fixtures/build-disk-images.sh "$size")
work=$(mktemp -d /var/tmp/vmdepot-lazyread.XXXXXX)
D=$work/depot
cleanup() {
    "$vmdepot" --depot "$D" instance delete r --force >/dev/null 2>&1 || true
    [ -n "${nbd_pid:-}" ] && kill "$nbd_pid" 2>/dev/null || true
    rm -rf "$work" /dev/shm/vmdepot-lazyread.*
}
trap cleanup EXIT
V() { "$vmdepot" --depot "$D" "$@"; }
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN{printf "%.2f", b-a}'; }

V image import "$img/A.raw" --name A -q >/dev/null
id=$(V image show A --json | sed -n 's/.*"id": *"\(img-[0-9a-f]*\)".*/\1/p' | head -1)
data=$(V image show A --json | sed -n 's/.*"data_bytes": *\([0-9]*\).*/\1/p' | head -1)
vsize=$(V image show A --json | sed -n 's/.*"virtual_size": *\([0-9]*\).*/\1/p' | head -1)
# A lazy instance gives the image an export (its id); QEMU just sits in
# SeaBIOS (A is a bare filesystem), the benchmark reads the same export.
V instance run A --name r --memory 64M -q >/dev/null
ins=$(V instance show r --json | sed -n 's/.*"id": *"\(ins-[0-9a-f]*\)".*/\1/p' | head -1)
lazy="nbd+unix:///$ins?socket=$D/serve/$id.sock"
# The base file, served by qemu-nbd (read-only, writeback cache, like ours).
V image export A "$work/base.raw" -q
qemu-nbd --read-only --persistent --shared=4 --cache=writeback -f raw \
    --socket="$work/base.sock" "$work/base.raw" &
nbd_pid=$!
for _ in $(seq 100); do [ -S "$work/base.sock" ] && break; sleep 0.05; done
base="nbd+unix:///?socket=$work/base.sock"
cat "$work/base.raw" >/dev/null
find "$D/packs" -type f -exec cat {} + >/dev/null

out=/dev/shm/vmdepot-lazyread.$$
seq_lazy=$(secs qemu-img convert -f raw -O raw "$lazy" "$out"); rm -f "$out"
seq_base=$(secs qemu-img convert -f raw -O raw "$base" "$out"); rm -f "$out"
seq_export=$(secs "$vmdepot" --depot "$D" image export A "$out" -q); rm -f "$out"
# 4 KiB reads spread over the data: restart the lazy server's cache by
# stopping and starting the instance (a fresh server process).
V instance stop r --force >/dev/null
V instance start r -q >/dev/null
bench() { qemu-img bench -f raw -c 20000 -d 1 -s 4096 -S 102400 "$1" 2>&1 | sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p'; }
rnd_lazy=$(bench "$lazy")
rnd_base=$(bench "$base")
us() { awk -v s="$1" 'BEGIN{printf "%.0f", s / 20000 * 1e6}'; }
mbs() { awk -v b="$vsize" -v s="$1" 'BEGIN{printf "%.0f", b / 1048576 / s}'; }
table=$(cat <<T
| read of image A ($size, $((data / 1048576)) MiB of data) | vmdepot disk server | qemu-nbd on the base file | vmdepot image export |
|---|---|---|---|
| whole image, sequential (qemu-img convert), s | $seq_lazy ($(mbs "$seq_lazy") MiB/s) | $seq_base ($(mbs "$seq_base") MiB/s) | $seq_export |
| 20,000 reads of 4 KiB, depth 1, s | $rnd_lazy ($(us "$rnd_lazy") µs each) | $rnd_base ($(us "$rnd_base") µs each) | |
T
)
echo "$table"
[ -n "$out_md" ] && echo "$table" >"$out_md"
