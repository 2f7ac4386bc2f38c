#!/usr/bin/env bash
# Launch and boot by disk mode (`instance run --disk MODE`): `lazy` (QEMU
# reads the image through an NBD server from the chunk store, no base file)
# against `overlay` (qcow2 overlay on a raw base file, materialised by the
# first run of an image). Each measurement starts from an image whose base
# is not made yet.
#   Debian 12 guest (fixtures/build-debian-guest.sh; cloud-init, sshd), one
#     fresh depot per mode: wall time of `instance run` (until QEMU runs),
#     seconds from the start of `instance run` until SSH answers with the
#     seed's key, and store_bytes_read (`instance show --json`) at that
#     moment, also as a share of the image's data bytes.
#   Tiny test guest (fixtures/build-test-guest.sh): the same, to the serial
#     marker `VMDEPOT-GUEST: ready`.
#   Synthetic images with 2 GiB and 20 GiB of incompressible data in a
#     24 GiB sparse disk (not bootable: QEMU sits in SeaBIOS): wall time of
#     `instance run` only; the instance is deleted at once.
# A mode that `instance run` refuses prints "n/a (unsupported)"; a field
# `instance show --json` does not have prints "n/a".
#
# Usage: benches/lazy.sh [OUT.md]
# Environment: MODES (default "lazy overlay"; e.g. "copy overlay"),
#   SIZES (synthetic data sizes in GiB, default "2 20"; "" skips them),
#   ACCEL (default auto), BOOT_TIMEOUT (s, default 600), VMDEPOT (a vmdepot
#   binary to measure instead of building this tree's), ROUNDS (default 1:
#   the guests' boots are measured that many times, the modes taking turns,
#   and the boot columns show the median, then every time in brackets).
# Needs root (the Debian fixture's build), ssh and ssh-keygen, openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
out_md=${1:-}
modes=${MODES:-lazy overlay}
sizes=${SIZES-2 20}
accel=${ACCEL:-auto}
boot_timeout=${BOOT_TIMEOUT:-600}
rounds=${ROUNDS:-1}
bash .ci/setup >/dev/null
for t in ssh ssh-keygen openssl; do
    command -v "$t" >/dev/null || { echo "lazy: needs $t" >&2; exit 1; }
done
if [ -n "${VMDEPOT:-}" ]; then
    vmdepot=$(realpath "$VMDEPOT")
else
    cargo build --release -q
    vmdepot=$PWD/target/release/vmdepot
fi
debian=$(bash fixtures/build-debian-guest.sh)
tiny=$(bash fixtures/build-test-guest.sh)
work=$(mktemp -d /var/tmp/vmdepot-lazy.XXXXXX)

log() { echo "lazy: $*" >&2; }
load0=$(cut -d' ' -f1-3 /proc/loadavg)
# Every depot this script made: on any exit, drop_depot on each.
depots=()
# drop_depot DIR: deletes its instances, kills by pid what still runs on it
# (a QEMU names its instance's files on its command line, a disk server
# the depot), removes it.
drop_depot() {
    local d=$1 n p
    [ -d "$d" ] || return 0
    for n in $("$vmdepot" --depot "$d" instance list --json 2>/dev/null | awk -F'"' '/"name":/{print $4}'); do
        "$vmdepot" --depot "$d" -q instance delete "$n" --force >/dev/null 2>&1 || true
    done
    for p in /proc/[0-9]*; do
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -e "--depot $d " -e "$d/instances/" &&
            kill -9 "${p#/proc/}" 2>/dev/null || true
    done
    rm -rf "$d"
}
cleanup() {
    local d
    for d in "${depots[@]}"; do drop_depot "$d"; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }
# jfield FIELD: the value of a top-level scalar FIELD in pretty JSON on stdin ("" if absent).
jfield() { awk -v k="\"$1\":" '$1 == k { v = $2; sub(/,$/, "", v); gsub(/"/, "", v); print v; exit }'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "n/a"; else printf "%.1f %%", 100*a/b }'; }

new_depot() { # new_depot NAME: prints its path
    local d=$work/$1
    depots+=("$d")
    echo "$d"
}
vd() { local d=$1; shift; "$vmdepot" --depot "$d" "$@"; }

# run_mode DEPOT IMAGE NAME MODE ARGS...: `instance run`; sets RUN_S
# (seconds, or "n/a (unsupported)" / "fail") and T0 (its start).
run_mode() {
    local d=$1 img=$2 name=$3 mode=$4 rc=0 t1
    shift 4
    rm -f "$d"/bases/*.raw
    sync
    sleep 2
    T0=$(now)
    vd "$d" -q instance run "$img" --name "$name" --disk "$mode" --accel "$accel" "$@" \
        >"$work/run.out" 2>"$work/run.err" || rc=$?
    t1=$(now)
    if [ "$rc" != 0 ]; then
        if grep -qi "$mode" "$work/run.err" && grep -qiE "unknown|invalid|unsupported|not supported|possible values|use overlay" "$work/run.err"; then
            RUN_S="n/a (unsupported)"
        else
            RUN_S=fail
        fi
        log "instance run --disk $mode of $img: $(tr '\n' ' ' <"$work/run.err")"
        return 1
    fi
    RUN_S=$(secs "$T0" "$t1")
}

# store_read DEPOT NAME: store_bytes_read of the instance, or "".
store_read() { vd "$1" instance show "$2" --json 2>/dev/null | jfield store_bytes_read; }

# wait_until DEADLINE_S CMD...: polls CMD (every 0.5 s) until it succeeds.
wait_until() {
    local limit=$1 start
    shift
    start=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) - start < limit)) || return 1
        sleep 0.5
    done
}

declare -A R # R[guest,mode,metric]

ssh-keygen -q -t ed25519 -N '' -f "$work/key"
ssh_ok() { # ssh_ok PORT
    ssh -i "$work/key" -p "$1" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o ConnectTimeout=3 -o BatchMode=yes -o LogLevel=ERROR debian@127.0.0.1 true </dev/null
}

# boots GUEST MODE: notes R[GUEST,MODE,boot] of this round in
# R[GUEST,MODE,boots].
boots() { R[$1,$2,boots]="${R[$1,$2,boots]:-} ${R[$1,$2,boot]}"; }
# median GUEST MODE: R[GUEST,MODE,boot] becomes the median of its rounds
# (then all of them), when there was more than one.
median() {
    local all=${R[$1,$2,boots]:-}
    [ "$rounds" -gt 1 ] || return 0
    R[$1,$2,boot]=$(tr ' ' '\n' <<<"$all" | grep -E '^[0-9.]+$' | sort -n |
        awk -v all="$all" '{v[NR]=$1} END { if (NR == 0) { print "n/a (" all " )"; exit }
            m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.2f [%s ]", m, all }')
}

# --- Debian 12 guest: one fresh depot per mode and round.
deb_data=
for round in $(seq "$rounds"); do
for mode in $modes; do
    d=$(new_depot "debian-$mode")
    vd "$d" -q image import "$debian" --name debian-12 >/dev/null
    deb_data=$(vd "$d" image show debian-12 --json | jfield data_bytes)
    name=d-$mode
    R[debian,$mode,run]=- R[debian,$mode,boot]=n/a R[debian,$mode,read]=-
    if run_mode "$d" debian-12 "$name" "$mode" --memory 1024M --cpus 2 --ssh-key "$work/key.pub"; then
        R[debian,$mode,run]=$RUN_S
        port=$(vd "$d" instance show "$name" --json | jfield ssh_port)
        if [ -n "$port" ] && [ "$port" != null ] && wait_until "$boot_timeout" ssh_ok "$port"; then
            t=$(now)
            R[debian,$mode,boot]=$(secs "$T0" "$t")
            R[debian,$mode,read]=$(store_read "$d" "$name")
        else
            R[debian,$mode,boot]="timeout (${boot_timeout} s)"
            log "debian ($mode): no SSH; serial log tail:"
            vd "$d" instance logs "$name" 2>/dev/null | tail -n 15 >&2 || true
        fi
        log "debian ($mode, round $round): run ${R[debian,$mode,run]} s, SSH ${R[debian,$mode,boot]} s, store_bytes_read ${R[debian,$mode,read]:-n/a}"
    else
        R[debian,$mode,run]=$RUN_S
    fi
    boots debian "$mode"
    drop_depot "$d"
done
done
for mode in $modes; do median debian "$mode"; done

# --- Tiny test guest: one depot, its base removed before each run.
d=$(new_depot tiny)
vd "$d" -q image import "$tiny" --name tiny >/dev/null
tiny_data=$(vd "$d" image show tiny --json | jfield data_bytes)
marker() { vd "$1" instance logs "$2" 2>/dev/null | grep -q "VMDEPOT-GUEST: ready"; }
for round in $(seq "$rounds"); do
for mode in $modes; do
    name=t-$mode
    R[tiny,$mode,run]=- R[tiny,$mode,boot]=n/a R[tiny,$mode,read]=-
    if run_mode "$d" tiny "$name" "$mode" --memory 256M; then
        R[tiny,$mode,run]=$RUN_S
        if wait_until 120 marker "$d" "$name"; then
            t=$(now)
            R[tiny,$mode,boot]=$(secs "$T0" "$t")
            R[tiny,$mode,read]=$(store_read "$d" "$name")
        else
            R[tiny,$mode,boot]="timeout (120 s)"
        fi
        log "tiny ($mode, round $round): run ${R[tiny,$mode,run]} s, marker ${R[tiny,$mode,boot]} s"
    else
        R[tiny,$mode,run]=$RUN_S
    fi
    boots tiny "$mode"
    vd "$d" -q instance delete "$name" --force >/dev/null 2>&1 || true
done
done
for mode in $modes; do median tiny "$mode"; done
drop_depot "$d"

# --- Synthetic images: N GiB of data (AES-CTR of zeros: incompressible,
# cheap) at the start of a 24 GiB sparse disk. Peak disk use: the raw file
# and its store while importing, then the store and one base (the raw file
# is deleted after the import).
synth_sizes=()
for g in $sizes; do
    need=$(((2 * g + 4) << 20)) # KiB
    avail=$(df -Pk "$work" | awk 'NR==2{print $4}')
    if ((avail < need)); then
        log "skipping the $g GiB image: $((avail >> 20)) GiB free, needs $((need >> 20)) GiB"
        R[synth,$g,skip]="skipped: $((avail >> 20)) GiB free, needs $((need >> 20)) GiB"
        synth_sizes+=("$g")
        continue
    fi
    synth_sizes+=("$g")
    d=$(new_depot "synth-$g")
    raw=$work/synth-$g.raw
    log "generating $g GiB of data in a 24 GiB sparse file"
    openssl enc -aes-128-ctr -nosalt -pass pass:vmdepot-lazy -pbkdf2 </dev/zero 2>/dev/null |
        head -c $((g << 30)) >"$raw" || true
    [ "$(stat -c %s "$raw")" = $((g << 30)) ] || { log "generator wrote $(stat -c %s "$raw") bytes"; exit 1; }
    truncate -s 24G "$raw"
    t=$(now)
    vd "$d" -q image import "$raw" --name "synth-$g" >/dev/null
    R[synth,$g,import]=$(secs "$t" "$(now)")
    R[synth,$g,data]=$(vd "$d" image show "synth-$g" --json | jfield data_bytes)
    rm -f "$raw"
    for mode in $modes; do
        name=s$g-$mode
        run_mode "$d" "synth-$g" "$name" "$mode" --memory 128M || true
        R[synth,$g,$mode]=$RUN_S
        log "synthetic $g GiB ($mode): run $RUN_S"
        vd "$d" -q instance delete "$name" --force >/dev/null 2>&1 || true
        rm -f "$d"/bases/*.raw
    done
    drop_depot "$d"
done

val() { local v=${1:-}; [ -n "$v" ] || v=n/a; echo "$v"; }
bytes_cell() { case $1 in '' | - | null) echo "n/a" ;; *) echo "$1 ($(mib "$1") MiB)" ;; esac; }
share_cell() { case $1 in '' | - | null) echo "n/a" ;; *) pct "$1" "$2" ;; esac; }
{
    echo "Disk modes of \`instance run\`; $(nproc) cores; accel $accel; $(date -u +%Y-%m-%d); load average (1, 5, 15 min) $load0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (TCG guests slow down with it). Each run starts with no base file made."
    echo
    echo "Debian 12 guest (cloud-init, sshd; 2 vCPUs, 1 GiB): $(mib "$(($(stat -c %s "$debian")))") MiB apparent, $(mib "${deb_data:-0}") MiB of data (data_bytes), one fresh depot per mode:"
    echo
    echo "| disk mode | instance run s | start to SSH answering s | store_bytes_read at SSH | share of image data |"
    echo "|---|---|---|---|---|"
    for mode in $modes; do
        echo "| $mode | $(val "${R[debian,$mode,run]}") | $(val "${R[debian,$mode,boot]}") | $(bytes_cell "${R[debian,$mode,read]}") | $(share_cell "${R[debian,$mode,read]}" "$deb_data") |"
    done
    echo
    echo "Tiny test guest (256 MiB): $(mib "$tiny_data") MiB of data:"
    echo
    echo "| disk mode | instance run s | start to \`VMDEPOT-GUEST: ready\` s | store_bytes_read at the marker | share of image data |"
    echo "|---|---|---|---|---|"
    for mode in $modes; do
        echo "| $mode | $(val "${R[tiny,$mode,run]}") | $(val "${R[tiny,$mode,boot]}") | $(bytes_cell "${R[tiny,$mode,read]}") | $(share_cell "${R[tiny,$mode,read]}" "$tiny_data") |"
    done
    if [ ${#synth_sizes[@]} -gt 0 ]; then
        echo
        echo "Synthetic images (incompressible data at the start of a 24 GiB sparse disk; not bootable): \`instance run\` until QEMU runs, 128 MiB:"
        echo
        printf '| image data | import s |'
        for mode in $modes; do printf ' %s: instance run s |' "$mode"; done
        echo
        printf '|---|---|'
        for mode in $modes; do printf -- '---|'; done
        echo
        for g in "${synth_sizes[@]}"; do
            if [ -n "${R[synth,$g,skip]:-}" ]; then
                echo "| $g GiB | ${R[synth,$g,skip]} |"
                continue
            fi
            printf '| %s GiB (%s MiB data_bytes) | %s |' "$g" "$(mib "${R[synth,$g,data]:-0}")" "${R[synth,$g,import]}"
            for mode in $modes; do printf ' %s |' "$(val "${R[synth,$g,$mode]}")"; done
            echo
        done
    fi
} | tee "$work/table.md"
if [ -n "$out_md" ]; then
    cp "$work/table.md" "$out_md"
fi
