#!/usr/bin/env bash
# Boot from a remote depot (a 3-node loopback Garage cluster,
# benches/garage-cluster.sh): `instance run REMOTE:IMAGE` with a lazy disk
# (a partial image: the disk server fetches the frames the guest reads)
# against pulling the image first (`image pull`, then `instance run`).
# Host 1 imports and pushes to remote r, then boots each guest lazily once
# (recording its read profile) and pushes it to remote p, whose frames
# then hold what that boot read first; each measurement starts on a fresh
# depot.
#   Debian 12 guest (fixtures/build-debian-guest.sh; cloud-init, sshd):
#     wall time of `instance run` (with the pull, for pull-first), seconds
#     until SSH answers with the seed's key, and remote_bytes_fetched
#     (`instance show --json`) at that moment, also as a share of the
#     image's stored size on the remote (the push's bytes_sent).
#   Tiny test guest (fixtures/build-test-guest.sh): the same, to the
#     serial marker `VMDEPOT-GUEST: ready`.
# Usage: benches/lazy-remote.sh [OUT.md]
# Environment: ACCEL (default auto), BOOT_TIMEOUT (s, default 600),
#   GUESTS (default "tiny debian-12"), WAYS (default "lazy profiled
#   prefetch pull"; lazy: `instance run r:GUEST`; profiled: `instance run
#   p:GUEST`; prefetch: `instance run r:GUEST --prefetch`, whose fetched
#   column is what the guest's reads fetched, the rest coming by the
#   prefetch; pull: `image pull r:GUEST`, then `instance run GUEST`): the
#   rows measured (the others show n/a).
# Needs root (the Debian fixture's build), ssh and ssh-keygen.
set -euo pipefail
cd "$(dirname "$0")/.."
out_md=${1:-}
accel=${ACCEL:-auto}
boot_timeout=${BOOT_TIMEOUT:-600}
bash .ci/setup >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q
vmdepot=$PWD/target/release/vmdepot
debian=$(bash fixtures/build-debian-guest.sh)
tiny=$(bash fixtures/build-test-guest.sh)
work=$(mktemp -d /var/tmp/vmdepot-lazyr.XXXXXX)
log() { echo "lazy-remote: $*" >&2; }
load0=$(cut -d' ' -f1-3 /proc/loadavg)
cleanup() {
    local d p
    for d in "$work"/host*; do
        for p in /proc/[0-9]*; do
            tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -e "--depot $d " -e "$d/instances/" &&
                kill -9 "${p#/proc/}" 2>/dev/null || true
        done
    done
    bash benches/garage-cluster.sh stop "$work/garage"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
bash benches/garage-cluster.sh start "$work/garage" >/dev/null
# shellcheck disable=SC1091
. "$work/garage/env"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }
jfield() { awk -v k="\"$1\":" '$1 == k { v = $2; sub(/,$/, "", v); gsub(/"/, "", v); print v; exit }'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "n/a"; else printf "%.1f %%", 100*a/b }'; }
vd() { local h=$1; shift; "$vmdepot" --depot "$work/$h" "$@"; }
host() { # host NAME: a fresh depot with the remotes r and p
    rm -rf "${work:?}/$1"
    vd "$1" remote add r s3://vmdepot/plain --endpoint "$GARAGE_ENDPOINT" --region garage >/dev/null
    vd "$1" remote add p s3://vmdepot/profiled --endpoint "$GARAGE_ENDPOINT" --region garage >/dev/null
}
wait_until() {
    local limit=$1 start
    shift
    start=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) - start < limit)) || return 1
        sleep 0.5
    done
}
ssh-keygen -q -t ed25519 -N '' -f "$work/key"
ssh_ok() {
    ssh -i "$work/key" -p "$1" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o ConnectTimeout=3 -o BatchMode=yes -o LogLevel=ERROR debian@127.0.0.1 true </dev/null
}
tiny_ready() { vd "$1" instance logs "$2" | grep -q "VMDEPOT-GUEST: ready"; }

declare -A R # R[guest,mode,metric]
host host1
vd host1 -q image import "$debian" --name debian-12 >/dev/null
vd host1 -q image import "$tiny" --name tiny >/dev/null
# Remote r: pushed before any boot. Remote p: pushed after one lazy boot
# on host 1 (until ready), whose read profile orders the push.
for g in debian-12 tiny; do
    R[$g,stored]=$(vd host1 image push "$g" r --json | jfield bytes_sent)
    R[$g,data]=$(vd host1 image show "$g" --json | jfield data_bytes)
done
for g in ${GUESTS:-tiny debian-12}; do
    args=()
    [ "$g" = debian-12 ] && args=(--memory 1024M --cpus 2 --ssh-key "$work/key.pub")
    vd host1 -q instance run "$g" --name rec --accel "$accel" "${args[@]}" >/dev/null
    if [ "$g" = debian-12 ]; then
        wait_until "$boot_timeout" ssh_ok "$(vd host1 instance show rec --json | jfield ssh_port)"
    else
        wait_until "$boot_timeout" tiny_ready host1 rec
    fi
    vd host1 -q instance delete rec --force >/dev/null
    id=$(vd host1 image show "$g" --json | jfield id)
    wait_until 30 test -s "$work/host1/profiles/$id.reads" || log "$g: no read profile recorded"
    t0=$(now)
    push=$(vd host1 image push "$g" p --json)
    R[$g,pstored]=$(jfield bytes_sent <<<"$push")
    log "$g: pushed to p in $(secs "$t0" "$(now)") s with $(jfield chunks_read_first <<<"$push") chunks read first"
done
sync
# measure GUEST MODE: MODE lazy (instance run r:GUEST) or pull (pull, then run)
measure() {
    local g=$1 mode=$2 h=host-$1-$2 t0 t1 port args=()
    host "$h"
    [ "$g" = debian-12 ] && args=(--memory 1024M --cpus 2 --ssh-key "$work/key.pub")
    R[$g,$mode,run]=fail R[$g,$mode,boot]=n/a R[$g,$mode,fetched]=-
    sleep 2
    t0=$(now)
    if [ "$mode" = pull ]; then
        vd "$h" -q image pull r:"$g" >/dev/null 2>"$work/err" || { log "pull: $(cat "$work/err")"; return 0; }
        vd "$h" -q instance run "$g" --name vm --accel "$accel" "${args[@]}" >/dev/null 2>"$work/err" ||
            { log "run: $(cat "$work/err")"; return 0; }
    else
        local from=r
        [ "$mode" = prefetch ] && args+=(--prefetch)
        [ "$mode" = profiled ] && from=p
        vd "$h" -q instance run "$from:$g" --name vm --accel "$accel" "${args[@]}" >/dev/null 2>"$work/err" ||
            { log "run: $(cat "$work/err")"; return 0; }
    fi
    t1=$(now)
    R[$g,$mode,run]=$(secs "$t0" "$t1")
    local ok=0
    if [ "$g" = debian-12 ]; then
        port=$(vd "$h" instance show vm --json | jfield ssh_port)
        wait_until "$boot_timeout" ssh_ok "$port" && ok=1
    else
        wait_until "$boot_timeout" tiny_ready "$h" vm && ok=1
    fi
    if [ $ok = 1 ]; then
        R[$g,$mode,boot]=$(secs "$t0" "$(now)")
        R[$g,$mode,fetched]=$(vd "$h" instance show vm --json | jfield remote_bytes_fetched)
    else
        R[$g,$mode,boot]="timeout (${boot_timeout} s)"
        vd "$h" instance logs vm 2>/dev/null | tail -n 15 >&2 || true
    fi
    log "$g ($mode): run ${R[$g,$mode,run]} s, ready ${R[$g,$mode,boot]} s, fetched ${R[$g,$mode,fetched]}"
    vd "$h" -q instance delete vm --force >/dev/null 2>&1 || true
}
for g in ${GUESTS:-tiny debian-12}; do
    for mode in ${WAYS:-lazy profiled prefetch pull}; do measure "$g" "$mode"; done
done

{
    echo "Boot from a remote (3-node loopback Garage), $(nproc) cores, accel $accel, load before $load0"
    echo
    echo "| guest | data / stored on the remote | way | \`instance run\` (s) | until ready (s) | fetched until ready | share of stored |"
    echo "|---|---|---|---|---|---|---|"
    for g in debian-12 tiny; do
        what="ready marker"
        [ "$g" = debian-12 ] && what="SSH"
        for mode in lazy profiled prefetch pull; do
            way="lazy from the remote"
            [ "$mode" = pull ] && way="pull, then run"
            [ "$mode" = prefetch ] && way="lazy, --prefetch"
            [ "$mode" = profiled ] && way="lazy, pushed after a boot (read profile)"
            stored=${R[$g,stored]}
            [ "$mode" = profiled ] && stored=${R[$g,pstored]:-0}
            f=${R[$g,$mode,fetched]:--}
            if [ "$mode" = prefetch ]; then
                fshow="all (reads: $(mib "${f/-/0}") MiB)"; share="100 %"
            elif [ "$mode" = pull ]; then
                fshow="${R[$g,stored]} (the pull)"; share="100 %"; f=${R[$g,stored]}
                fshow="$(mib "$f") MiB (the pull)"
            elif [ "$f" = - ] || [ "$f" = null ] || [ -z "$f" ]; then
                fshow=n/a; share=n/a
            else
                fshow="$(mib "$f") MiB"; share=$(pct "$f" "$stored")
            fi
            echo "| $g ($what) | $(mib "${R[$g,data]}") / $(mib "$stored") MiB | $way | ${R[$g,$mode,run]:-n/a} | ${R[$g,$mode,boot]:-n/a} | $fshow | $share |"
        done
    done
} | tee "$work/table.md"
[ -n "$out_md" ] && cp "$work/table.md" "$out_md"
exit 0
