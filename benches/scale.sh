#!/usr/bin/env bash
# Cost as a depot grows (issue 13): distinct images of unique, compressible
# data imported one after another into one depot.
#
# Each image is SIZE (2G by default) of which 90 % is data: random bytes
# (Python's generator seeded with the image's number) written as hex text,
# so every 4 KiB block differs from every other, and zstd -3 compresses it
# about 2.1x (text-like, as the issue's data); the rest is a hole. For each image: the import's wall time and peak RSS,
# and catalog.db's size after it; then, on the full depot, the time of
# `image list`, `image show`, `stats`, `fsck`, and `image delete` + `gc` of
# one image. The peers on the last image's file: `zstd -3 -T2` to a file,
# and borg with fixed 4 MiB chunks into a repository holding the others.
#
# Usage: benches/scale.sh [SIZE] [IMAGES] [OUT.md]   (2G, 9 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
count=${2:-9}
out_md=${3:-}
bash .ci/setup >/dev/null
cargo build --release -q
vmdepot=$PWD/target/release/vmdepot
work=$(mktemp -d /var/tmp/vmdepot-scale.XXXXXX)
trap 'rm -rf "$work"' EXIT
bytes=$(numfmt --from=iec "$size")
data=$(( bytes / 10 * 9 / 4096 * 4096 ))

# gen N FILE: image N (distinct data for each N): random bytes printed as
# `od -An -tx1` prints them (16 a line), then a hole.
gen() {
    python3 - "$1" "$data" "$2" <<'PY'
import random, sys
seed, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
r = random.Random(seed)
with open(out, 'wb') as f:
    f.truncate(0)
    while n > 0:
        raw = r.randbytes(16 * 16384)
        s = b''.join(b' ' + raw[i:i + 16].hex(' ').encode() + b'\n' for i in range(0, len(raw), 16))[:n]
        f.write(s)
        n -= len(s)
PY
    truncate -s "$bytes" "$2"
}

# timed CMD...: runs it; prints "SECONDS RSS_MIB".
timed() {
    local s e
    s=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$work/rss" "$@" >"$work/log" 2>&1 \
        || { echo "scale: $* failed:" >&2; tail -5 "$work/log" >&2; exit 1; }
    e=$(date +%s.%N)
    awk -v a="$s" -v b="$e" -v r="$(tail -1 "$work/rss")" 'BEGIN{printf "%.2f %d\n", b-a, r/1024}'
}
# median3 CMD...: median wall seconds of three runs.
median3() {
    local a b c
    a=$(timed "$@" | cut -d' ' -f1); b=$(timed "$@" | cut -d' ' -f1); c=$(timed "$@" | cut -d' ' -f1)
    printf '%s\n%s\n%s\n' "$a" "$b" "$c" | sort -n | sed -n 2p
}
mb() { awk -v b="$(stat -c %s "$1")" 'BEGIN{printf "%.0f", b/1e6}'; }

depot=$work/depot
img=$work/img.raw
row_n="| images already in the depot |"; row_sep="|---|"
row_t="| import of the next one, s |"; row_r="| peak RSS, MiB |"; row_c="| catalog.db after it, MB |"
for ((i = 0; i < count; i++)); do
    gen "$i" "$img"
    cat "$img" >/dev/null
    sync
    read -r t r < <(timed "$vmdepot" --depot "$depot" -q image import "$img" --name "img-$i" --json)
    row_n+=" $i |"; row_sep+="---|"; row_t+=" $t |"; row_r+=" $r |"; row_c+=" $(mb "$depot/catalog.db") |"
    echo "scale: image $i: ${t} s, ${r} MiB" >&2
done
unique=$(awk -v d="$data" -v n="$count" 'BEGIN{printf "%.0f", d*n}')
catalog=$(stat -c %s "$depot/catalog.db")

# The peers, on the last image.
zstd_t=$(timed zstd -3 -T2 -q -f "$img" -o "$work/img.zst" | cut -d' ' -f1)
export BORG_PASSPHRASE='' BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
borg init -e none "$work/borg"
for ((i = 0; i < count - 1; i++)); do
    gen "$i" "$work/prev.raw"
    borg create --sparse --chunker-params fixed,4194304 --compression zstd,3 "$work/borg::b$i" "$work/prev.raw"
done
rm -f "$work/prev.raw"
borg_t=$(timed borg create --sparse --chunker-params fixed,4194304 --compression zstd,3 "$work/borg::last" "$img" | cut -d' ' -f1)

list_t=$(median3 "$vmdepot" --depot "$depot" image list)
show_t=$(median3 "$vmdepot" --depot "$depot" image show img-0)
stats_t=$(median3 "$vmdepot" --depot "$depot" stats)
read -r fsck_t fsck_r < <(timed "$vmdepot" --depot "$depot" fsck)
read -r del_t _ < <(timed "$vmdepot" --depot "$depot" -q image delete img-0)
read -r gc_t gc_r < <(timed "$vmdepot" --depot "$depot" -q gc)

table=$(cat <<EOF
Scale: $count distinct $size images ($(numfmt --to=iec "$data") of unique hex-text data each, every 4 KiB block different) imported one after another into one depot.

$row_n
$row_sep
$row_t
$row_r
$row_c

| on the last image's file | s |
|---|---|
| vmdepot import (into $((count - 1)) images) | $(echo "$row_t" | awk -F'|' '{print $(NF-1)}' | tr -d ' ') |
| zstd -3 -T2 | $zstd_t |
| borg create, fixed 4 MiB, zstd 3 (repository of $((count - 1))) | $borg_t |

| on the depot of $count images | s |
|---|---|
| image list (median of 3) | $list_t |
| image show (median of 3) | $show_t |
| stats (median of 3) | $stats_t |
| fsck | $fsck_t (RSS $fsck_r MiB) |
| image delete | $del_t |
| gc after it | $gc_t (RSS $gc_r MiB) |

catalog.db: $(numfmt --to=si "$catalog")B for $(numfmt --to=iec "$unique") of unique raw data: $(awk -v c="$catalog" -v u="$unique" 'BEGIN{printf "%.2f", 100*c/u}') %.
EOF
)
echo "$table"
[ -z "$out_md" ] || echo "$table" >"$out_md"
