#!/usr/bin/env bash
# Image build (issue 15): `vmdepot image build debian-12` from the host's
# apt mirror into a fresh depot, and what it gives.
#   build time: first (empty package cache: everything downloaded from the
#     mirror) and cached (the same recipe again, same cache);
#   sizes: virtual, data bytes, stored bytes, against zstd -3 -T2 and
#     qemu-img convert -c of the same image exported raw;
#   reproducibility: the two builds' content digests, the share of the
#     second's stored bytes it shares with the first, and the files whose
#     content differs (both root filesystems mounted read-only);
#   marketplace: `--from` the first build with nginx-light and a --run
#     script: stored bytes of its own, against the compressed size of the
#     packages it added (their .debs; goal <= 1.3x);
#   boot to SSH under TCG (or KVM where it runs): seconds from the start of
#     `instance run` until `instance wait --ssh` returns, BIOS (the base)
#     and UEFI (the marketplace image).
# Usage: benches/build.sh [OUT.md]   (appends the tables to OUT.md)
# Environment: VMDEPOT (a binary to measure instead of this tree's).
# Needs root (the build), network to the apt mirror, qemu-img, zstd.
set -euo pipefail
cd "$(dirname "$0")/.."
out_md=${1:-}
bash .ci/setup >/dev/null
if [ -n "${VMDEPOT:-}" ]; then
    vmdepot=$(realpath "$VMDEPOT")
else
    cargo build --release -q --bin vmdepot
    vmdepot=$PWD/target/release/vmdepot
fi
work=$(mktemp -d /var/tmp/vmdepot-build-bench.XXXXXX)
d=$work/depot
mounts=()
cleanup() {
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
    for n in bios uefi; do "$vmdepot" --depot "$d" instance delete "$n" --force >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT
log() { echo "build-bench: $*" >&2; }
v() { "$vmdepot" --depot "$d" "$@"; }
field() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(eval("v"+sys.argv[1]))' "$1"; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
load0=$(cut -d' ' -f1-3 /proc/loadavg)

timed() { # timed VAR CMD...: seconds into VAR
    local t0 t1
    t0=$(date +%s.%N)
    "${@:2}"
    t1=$(date +%s.%N)
    printf -v "$1" '%.1f' "$(echo "$t1 - $t0" | bc)"
}

log "first build (empty package cache)"
timed first v image build debian-12 --name b1 --cache "$work/debs" -q >/dev/null
log "second build (cached)"
timed cached v image build debian-12 --name b2 --cache "$work/debs" -q >/dev/null
b1=$(v image show b1 --json)
b2=$(v image show b2 --json)
virt=$(field '["virtual_size"]' <<<"$b1")
data=$(field '["data_bytes"]' <<<"$b1")
# (its own plus what the second build shares with it)
stored=$(( $(field '["unique_stored_bytes"]' <<<"$b1") + $(field '["shared_stored_bytes"]' <<<"$b1") ))
dig1=$(field '["content_digest"]' <<<"$b1")
dig2=$(field '["content_digest"]' <<<"$b2")
u2=$(field '["unique_stored_bytes"]' <<<"$b2")
s2=$(field '["shared_stored_bytes"]' <<<"$b2")

v image export b1 "$work/b1.raw" -q
v image export b2 "$work/b2.raw" -q
timed zt zstd -3 -T2 -q -f "$work/b1.raw" -o "$work/b1.zst"
zsize=$(stat -c %s "$work/b1.zst")
rm -f "$work/b1.zst"
timed qt qemu-img convert -c -O qcow2 "$work/b1.raw" "$work/b1.qcow2"
qsize=$(stat -c %s "$work/b1.qcow2")
rm -f "$work/b1.qcow2"

# mount_root RAW DIR: the root filesystem (partition 2 at sector 67584), read-only
mount_root() {
    mkdir -p "$2"
    mount -o ro,loop,noload,offset=$((67584 * 512)) "$1" "$2"
    mounts+=("$2")
}
mount_root "$work/b1.raw" "$work/r1"
mount_root "$work/b2.raw" "$work/r2"
# (device nodes are not compared by diff: the same on both, left out)
differ=$(cd "$work" && { diff -rq --no-dereference r1 r2 2>&1 || true; } | grep -v 'special file while' | head -20)
ndiffer=$(cd "$work" && { diff -rq --no-dereference r1 r2 2>&1 || true; } | grep -vc 'special file while' || true)

log "marketplace build --from b1"
cat >"$work/setup.sh" <<'EOF'
echo '<h1>vmdepot marketplace page</h1>' > /var/www/html/index.html
EOF
timed webt v image build debian-12 --from b1 --name web --package nginx-light --run "$work/setup.sh" \
    --type marketplace --vendor nginx --application nginx --app-version 1.22 --cache "$work/debs" -q >/dev/null
web=$(v image show web --json)
wu=$(field '["unique_stored_bytes"]' <<<"$web")
v image export web "$work/web.raw" -q
mount_root "$work/web.raw" "$work/rw"
pkgs() { dpkg-query --admindir="$1/var/lib/dpkg" -W -f '${Package}_${Version}_${Architecture}\n' | sed 's/:/%3a/' | sort; }
added=$(comm -13 <(pkgs "$work/r1") <(pkgs "$work/rw"))
debs=0
missing=""
for p in $added; do
    f=$(find "$work/debs" -name "$p.deb" | head -1)
    if [ -n "$f" ]; then debs=$((debs + $(stat -c %s "$f"))); else missing="$missing $p"; fi
done
for m in "${mounts[@]}"; do umount "$m"; done
mounts=()

boot() { # boot NAME IMAGE FIRMWARE: seconds to SSH
    local t0 t1
    t0=$(date +%s.%N)
    v instance run "$2" --name "$1" --firmware "$3" --memory 1024M -q >/dev/null
    v instance wait "$1" --ssh --timeout 600 >/dev/null
    t1=$(date +%s.%N)
    v instance delete "$1" --force >/dev/null
    printf '%.1f' "$(echo "$t1 - $t0" | bc)"
}
log "boots"
bios=$(boot bios b1 bios)
uefi=$(boot uefi web uefi)
accel=$(v instance run b1 --name bios --firmware bios -q >/dev/null && v instance show bios --json | field '["accel"]')
v instance delete bios --force >/dev/null

same=no
[ "$dig1" = "$dig2" ] && same=yes
{
    echo
    echo "## Image build (issue 15)"
    echo
    echo "Generated by \`benches/build.sh\`; $(nproc) cores; $(date -u +%Y-%m-%d); load before: $load0. debian-12 from $(field '["tags"]["build.mirror"]' <<<"$b1"), kernel $(field '["tags"]["build.kernel"]' <<<"$b1")."
    echo
    echo "| measure | result |"
    echo "|---|---|"
    echo "| first build, empty package cache | $first s |"
    echo "| second build, cached packages | $cached s |"
    echo "| image: virtual / data / stored (vmdepot) | $(mib "$virt") / $(mib "$data") / $(mib "$stored") MiB |"
    echo "| same image, zstd -3 -T2 | $(mib "$zsize") MiB ($zt s) |"
    echo "| same image, qemu-img convert -c (qcow2) | $(mib "$qsize") MiB ($qt s) |"
    echo "| two builds' digests | ${dig1:0:16}… / ${dig2:0:16}… (same: $same) |"
    echo "| second build: stored of its own / shared with the first | $(mib "$u2") / $(mib "$s2") MiB ($(ratio "$((s2 * 100))" "$((u2 + s2))")% shared) |"
    echo "| files whose content differs between the two builds | $ndiffer |"
    echo "| marketplace (nginx-light, --from): build time | $webt s |"
    echo "| marketplace: stored of its own (vmdepot) | $(mib "$wu") MiB |"
    echo "| its added packages, compressed (.debs: $(echo $added | wc -w)) | $(mib "$debs") MiB${missing:+ (not found:$missing)} |"
    echo "| marketplace stored / added packages | $(ratio "$wu" "$debs")x (goal <= 1.3) |"
    echo "| boot to SSH, BIOS (base) | $bios s |"
    echo "| boot to SSH, UEFI (marketplace) | $uefi s |"
    echo
    echo "Accelerator (auto): $accel; guests of 1 vCPU, 1024 MiB."
    if [ -n "$differ" ]; then
        echo
        echo "Differing files (first 20, \`diff -rq\`):"
        echo
        echo '```'
        echo "$differ"
        echo '```'
    fi
} | tee -a "${out_md:-/dev/null}"
