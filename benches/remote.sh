#!/usr/bin/env bash
# vmdepot's remote depots against restic's S3 backend and a plain S3
# client (curl --aws-sigv4), on a 3-node loopback Garage cluster
# (benches/garage-cluster.sh), for the disk images A, B, B2 (fixtures/).
#   vmdepot: push A, B, B2 from host 1 (time, bytes sent); pull each into an
#            empty host and into a host that holds A (time, bytes fetched);
#            peak RSS of every push and pull.
#   restic:  backup of A, B, B2 (raw files) into its S3 repository; restore
#            of each into an empty directory.
#   plain:   PUT and GET of each image's `zstd -3` file (the transfer limit).
# Usage: benches/remote.sh [SIZE] [OUT.md]    (SIZE 2G by default)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
out_md=${2:-}
bash .ci/setup >/dev/null
cargo build --release -q
export PATH="$HOME/.cargo/bin:$PATH"
vmdepot=$PWD/target/release/vmdepot
img=$(bash fixtures/build-disk-images.sh "$size")
work=$(mktemp -d /var/tmp/vmdepot-rbench.XXXXXX)
trap 'bash benches/garage-cluster.sh stop "$work/garage"; rm -rf "$work"' EXIT
bash benches/garage-cluster.sh start "$work/garage" >/dev/null
# shellcheck disable=SC1091
. "$work/garage/env"
ep=$GARAGE_ENDPOINT
cat "$img"/A.raw "$img"/B.raw "$img"/B2.raw >/dev/null
sync

declare -A R
# run KEY CMD...: seconds into R[KEY], peak RSS (KiB) into R[KEY.rss], stdout in $work/out
run() {
    local key=$1; shift
    local s e
    s=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$work/rss" "$@" >"$work/out" 2>"$work/err" || { echo "bench: $key failed:" >&2; tail -5 "$work/err" >&2; R[$key]=fail; return 0; }
    e=$(date +%s.%N)
    R[$key]=$(awk -v a="$s" -v b="$e" 'BEGIN{printf "%.2f", b-a}')
    R[$key.rss]=$(tail -1 "$work/rss")
}
json() { python3 -c "import json,sys; print(json.load(open('$work/out'))$1)"; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }

vd() { local h=$1; shift; "$vmdepot" --depot "$work/host$h" "$@"; }
for h in 1 3; do vd "$h" remote add r s3://vmdepot --endpoint "$ep" --region garage >/dev/null; done
# the bytes each import added to host 1's packs: what each image has that the earlier ones lack
prev=0
for i in A B B2; do
    vd 1 image import "$img/$i.raw" --name "$i" -q >/dev/null
    now=$(vd 1 stats --json | python3 -c "import json,sys; print(json.load(sys.stdin)['stored_bytes'])")
    R[vd.new.$i]=$((now - prev)); prev=$now
done
for i in A B B2; do
    run "vd.push.$i" "$vmdepot" --depot "$work/host1" image push "$i" r --json
    R[vd.push.$i.bytes]=$(json "['bytes_sent']")
done
vd 3 image pull r:A --name A -q >/dev/null   # host 3 holds A
for i in A B B2; do
    rm -rf "$work/host2"; vd 2 remote add r s3://vmdepot --endpoint "$ep" --region garage >/dev/null
    run "vd.pull0.$i" "$vmdepot" --depot "$work/host2" image pull "r:$i" --json
    R[vd.pull0.$i.bytes]=$(json "['bytes_fetched']")
    run "vd.pullA.$i" "$vmdepot" --depot "$work/host3" image pull "r:$i" --name "$i-2" --json
    R[vd.pullA.$i.bytes]=$(json "['bytes_fetched']")
done
# host 3 pulled A first: its export is the original
vd 3 image export A "$work/A.out" -q
cmp "$work/A.out" "$img/A.raw"
rm -f "$work/A.out"

export RESTIC_REPOSITORY="s3:$ep/restic" RESTIC_PASSWORD=bench
restic init -q >/dev/null
for i in A B B2; do
    run "restic.backup.$i" restic backup -q "$img/$i.raw"
done
for i in A B B2; do
    snap=$(restic snapshots --json --path "$img/$i.raw" | python3 -c "import json,sys; print(json.load(sys.stdin)[-1]['short_id'])")
    rm -rf "$work/restore"
    run "restic.restore.$i" restic restore -q "$snap" --target "$work/restore"
done
rm -rf "$work/restore"

creds="$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
for i in A B B2; do
    zstd -q -3 -T1 -f "$img/$i.raw" -o "$work/$i.zst"
    R[plain.$i.bytes]=$(stat -c %s "$work/$i.zst")
    run "plain.put.$i" curl -sSf --aws-sigv4 "aws:amz:garage:s3" --user "$creds" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T "$work/$i.zst" "$ep/plain/$i.zst"
    run "plain.get.$i" curl -sSf --aws-sigv4 "aws:amz:garage:s3" --user "$creds" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o "$work/$i.get" "$ep/plain/$i.zst"
    cmp -s "$work/$i.zst" "$work/$i.get" || R[plain.get.$i]="DIFFERS"
    rm -f "$work/$i.zst" "$work/$i.get"
done

peak=0
for k in "${!R[@]}"; do
    case $k in vd.*.rss) (( R[$k] > peak )) && peak=${R[$k]} ;; esac
done
{
echo "Remote depots on a 3-node Garage cluster (loopback, replication 3), images $size: seconds (MiB)"
echo
echo "| image | vmdepot push (sent) | restic backup | plain PUT of .zst (size) | pull into empty host (fetched) | pull into host with A (fetched) | restic restore | plain GET of .zst |"
echo "|---|---|---|---|---|---|---|---|"
for i in A B B2; do
    echo "| $i | ${R[vd.push.$i]} ($(mib "${R[vd.push.$i.bytes]}")) | ${R[restic.backup.$i]} | ${R[plain.put.$i]} ($(mib "${R[plain.$i.bytes]}")) | ${R[vd.pull0.$i]} ($(mib "${R[vd.pull0.$i.bytes]}")) | ${R[vd.pullA.$i]} ($(mib "${R[vd.pullA.$i.bytes]}")) | ${R[restic.restore.$i]} | ${R[plain.get.$i]} |"
done
echo
echo "Bytes each import added to host 1's store (what the push after it must send at least): A $(mib "${R[vd.new.A]}"), B $(mib "${R[vd.new.B]}"), B2 $(mib "${R[vd.new.B2]}") MiB."
echo "Peak RSS of any vmdepot push or pull: $((peak / 1024)) MiB."
echo "Ratios: push A / restic backup A = $(awk -v a="${R[vd.push.A]}" -v b="${R[restic.backup.A]}" 'BEGIN{printf "%.2f", a/b}');" \
     "pull A (empty) / plain GET A = $(awk -v a="${R[vd.pull0.A]}" -v b="${R[plain.get.A]}" 'BEGIN{printf "%.2f", a/b}');" \
     "bytes sent for B / B's new bytes = $(awk -v a="${R[vd.push.B.bytes]}" -v b="${R[vd.new.B]}" 'BEGIN{printf "%.2f", a/b}')."
} | tee "$work/table.md"
[ -n "$out_md" ] && cp "$work/table.md" "$out_md"
exit 0
