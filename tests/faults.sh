#!/usr/bin/env bash
# tests/faults.sh [N] — SIGKILL fault injection (reliability issue 10).
#
# Run by hand, NOT in CI. For every operation (import raw/qcow2, gc with a
# repack, image copy, capture of a stopped and of a running instance, export,
# instance backup, instance restore) it measures one normal run, then runs it
# N times (default 20), each time killed with SIGKILL after a random delay in
# [0, measured duration]. After every kill it checks:
#   fsck clean     `vmdepot fsck --json` reports no problems (and exits 0)
#   images intact  every listed image is `available`, passes `image verify`,
#                  keeps the digest it had; an image the killed run finished
#                  exports to the bytes of its source (imports, copies)
#   guests paused  no instance is `paused` (show --json), nor is its QEMU
#                  (QMP query-status on the instance's qmp socket)
# At the end everything is deleted, `vmdepot gc` runs, and the depot must
# hold 0 stored bytes and no pack files ("gc leaks 0 bytes").
#
# Env: VMDEPOT (binary, default target/release/vmdepot), GUEST (bootable raw
# guest, default /var/cache/vmdepot-fixtures/guest/guest.raw), KEEP=1 keeps
# the work directory. Uses about 1 GiB under /tmp and one TCG guest.
set -u
N=${1:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
V=${VMDEPOT:-$ROOT/target/release/vmdepot}
GUEST=${GUEST:-/var/cache/vmdepot-fixtures/guest/guest.raw}
W=$(mktemp -d /tmp/vmdepot-faults.XXXXXX)
export VMDEPOT_DIR=$W/depot
LOG=$W/log
ROWS=()

cleanup() {
    # kill whatever still runs from this work dir (QEMUs, orphaned helpers)
    local p
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF "$W"; then
            kill -9 "${p#/proc/}" 2>/dev/null
        fi
    done
    if [ "${KEEP:-0}" = 1 ]; then echo "work dir kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

v() { "$V" -q "$@"; }
now() { date +%s.%N; }
rnd() { awk -v d="$1" -v r="$RANDOM$RANDOM" 'BEGIN{srand(r); printf "%.3f", d*rand()}'; }
log() { echo "$*" >>"$LOG"; }

# fresh data: 128 MiB virtual, 32 MiB of it random (4 x 8 MiB), rest holes
mkdata() {
    rm -f "$1"; truncate -s 128M "$1"
    local i
    for i in 0 4 8 12; do
        head -c 8M /dev/urandom | dd of="$1" bs=1M seek=$((i * 8)) conv=notrunc status=none
    done
}

# image id -> content digest, for the images that exist before a kill
declare -A DIG
snapshot() {
    DIG=()
    local id d
    while read -r id d; do DIG[$id]=$d; done < <(v image list --json --all 2>/dev/null |
        python3 -c 'import json,sys
for i in json.load(sys.stdin): print(i["id"], i["content_digest"])')
}

img_id() { v image show "$1" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' 2>/dev/null; }

# run_killed DELAY CMD... : run vmdepot, SIGKILL it after DELAY seconds.
# Sets KILLED=1 if it was still running, else 0 (it finished first).
run_killed() {
    local delay=$1; shift
    "$V" -q "$@" >>"$LOG" 2>&1 &
    local pid=$!
    sleep "$delay"
    if kill -9 "$pid" 2>/dev/null; then KILLED=1; else KILLED=0; fi
    wait "$pid" 2>/dev/null
    RC=$?
    [ "$KILLED" = 1 ] && [ "$RC" != 137 ] && KILLED=0
}

# checks; each sets a flag and appends a note
F_FSCK=0; F_IMG=0; F_PAUSE=0; NOTES=()
note() { NOTES+=("$*"); log "NOTE: $*"; }

check_fsck() { # depot round
    local out rc
    out=$("$V" --depot "$1" fsck --json 2>&1); rc=$?
    if [ $rc != 0 ] || ! python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(1 if d["problems"] else 0)' "$out" 2>/dev/null; then
        F_FSCK=$((F_FSCK + 1)); note "round $2: fsck ($1) rc=$rc: $(echo "$out" | tr '\n' ' ' | cut -c1-300)"
    fi
}

# check_images DEPOT ROUND [ID=SHA256 of the expected raw content]...
check_images() {
    local depot=$1 r=$2; shift 2
    local bad=0 id state dig
    while read -r id state dig; do
        if [ "$state" != available ]; then bad=1; note "round $r: $id listed as $state"; continue; fi
        if ! "$V" -q --depot "$depot" image verify "$id" >>"$LOG" 2>&1; then
            bad=1; note "round $r: image verify $id failed"
        fi
        if [ "$depot" = "$VMDEPOT_DIR" ] && [ -n "${DIG[$id]:-}" ] && [ "${DIG[$id]}" != "$dig" ]; then
            bad=1; note "round $r: $id digest changed"
        fi
    done < <("$V" --depot "$depot" image list --json --all 2>/dev/null | python3 -c 'import json,sys
for i in json.load(sys.stdin): print(i["id"], i["state"], i["content_digest"])')
    if [ "$depot" = "$VMDEPOT_DIR" ]; then
        for id in "${!DIG[@]}"; do
            if ! "$V" image show "$id" >/dev/null 2>&1; then bad=1; note "round $r: $id vanished"; fi
        done
    fi
    local want sha
    for want in "$@"; do
        id=${want%%=*}; sha=${want#*=}
        rm -f "$W/chk.raw"
        if ! "$V" -q --depot "$depot" image export "$id" "$W/chk.raw" >>"$LOG" 2>&1; then
            bad=1; note "round $r: export of $id failed"
        elif [ "$(sha256sum <"$W/chk.raw" | cut -d' ' -f1)" != "$sha" ]; then
            bad=1; note "round $r: $id exports other bytes than its source"
        fi
        rm -f "$W/chk.raw"
    done
    F_IMG=$((F_IMG + bad))
}

check_paused() { # round
    local name st rs qmp pid q bad=0
    while read -r name st rs qmp pid; do
        if [ "$st" = paused ] || [ "$rs" = paused ]; then bad=1; note "round $1: $name state $st/$rs"; fi
        if [ "$pid" != 0 ] && kill -0 "$pid" 2>/dev/null && [ -S "$qmp" ]; then
            q=$(qmp_status "$qmp")
            if [ "$q" != running ]; then bad=1; note "round $1: $name QMP status '$q'"; fi
        fi
    done < <(v instance list --json 2>/dev/null | python3 -c 'import json,sys
for i in json.load(sys.stdin): print(i["name"], i["state"], i.get("run_state") or "-", i["qmp_socket"], i.get("pid") or 0)')
    F_PAUSE=$((F_PAUSE + bad))
}

qmp_status() {
    python3 - "$1" <<'EOF' 2>/dev/null || echo "qmp-error"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
def cmd(c):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m or "error" in m: return m
print(cmd("qmp_capabilities") and cmd("query-status")["return"]["status"])
EOF
}

ensure_vm() { # running|stopped
    local st
    st=$(v instance show vm --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null)
    if [ "$1" = running ] && [ "$st" != running ]; then
        v instance start vm >>"$LOG" 2>&1 || note "instance start vm failed (state $st)"
    elif [ "$1" = stopped ] && [ "$st" != stopped ]; then
        v instance stop vm --force >>"$LOG" 2>&1 || note "instance stop vm failed (state $st)"
    fi
}

# delete images not in DIG (what the round created), quietly
drop_new() {
    local id
    for id in $(v image list --json --all 2>/dev/null | python3 -c 'import json,sys
for i in json.load(sys.stdin): print(i["id"])'); do
        [ -n "${DIG[$id]:-}" ] || v image delete "$id" --force >>"$LOG" 2>&1
    done
}

# one operation: OP  SETUP  RUN  AFTER  (shell functions taking the round)
op() {
    local name=$1 setup=$2 run=$3 after=$4 r t0 t1 dur kills=0 fin=0
    F_FSCK=0; F_IMG=0; F_PAUSE=0; NOTES=()
    echo "== $name" >>"$LOG"
    $setup 0; snapshot
    $run 0; t0=$(now)
    MEAS_OUT=$("$V" "${CMD[@]}" 2>&1) || note "measure run failed: $MEAS_OUT"
    t1=$(now); log "$MEAS_OUT"; dur=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
    $after 0 done
    for ((r = 1; r <= N; r++)); do
        $setup "$r"; snapshot
        $run "$r"
        run_killed "$(rnd "$dur")" "${CMD[@]}"
        if [ "$KILLED" = 1 ]; then kills=$((kills + 1)); else fin=$((fin + 1)); fi
        $after "$r" "$([ "$KILLED" = 1 ] && echo killed || echo done)"
    done
    local n="${dur}s normal; $fin/$N finished before the kill"
    [ ${#NOTES[@]} -gt 0 ] && n="$n; ${NOTES[*]}"
    ROWS+=("$name|$kills|$([ $F_FSCK = 0 ] && echo yes || echo "NO ($F_FSCK)")|$([ $F_IMG = 0 ] && echo yes || echo "NO ($F_IMG)")|$F_PAUSE|$n")
    echo "$name: done ($kills kills)" >&2
}

common_checks() { # round [expected...]
    local r=$1; shift
    check_fsck "$VMDEPOT_DIR" "$r"; check_images "$VMDEPOT_DIR" "$r" "$@"; check_paused "$r"
}

# ---- operations -----------------------------------------------------------
# each RUN function sets CMD (the vmdepot arguments); op() times/kills it

imp_setup() { mkdata "$W/src.raw"; SRC_SHA=$(sha256sum <"$W/src.raw" | cut -d' ' -f1); }
imp_run() { CMD=(image import "$W/src.raw" --name "imp-$1" --format raw); }
imp_after() {
    local id; id=$(img_id "imp-$1")
    [ "$2" = done ] && [ -z "$id" ] && note "round $1: import finished but image missing"
    common_checks "$1" ${id:+"$id=$SRC_SHA"}
    drop_new
}
q2_setup() { imp_setup; qemu-img convert -f raw -O qcow2 "$W/src.raw" "$W/src.qcow2"; }
q2_run() { CMD=(image import "$W/src.qcow2" --name "q2-$1"); }
q2_after() {
    local id; id=$(img_id "q2-$1")
    [ "$2" = done ] && [ -z "$id" ] && note "round $1: import finished but image missing"
    common_checks "$1" ${id:+"$id=$SRC_SHA"}
    drop_new
}

# gc: X = 64 MiB fresh random (one pack), Y = its first 16 MiB; delete X:
# X's pack is 25% live, so gc repacks Y's chunks and frees the rest
gc_setup() {
    v gc >>"$LOG" 2>&1
    head -c 64M /dev/urandom >"$W/x.raw"; truncate -s 64M "$W/y.raw"
    dd if="$W/x.raw" of="$W/y.raw" bs=1M count=16 conv=notrunc status=none
    GC_Y_SHA=$(sha256sum <"$W/y.raw" | cut -d' ' -f1)
    v image import "$W/x.raw" --name "gcx-$1" >>"$LOG" 2>&1
    v image import "$W/y.raw" --name "gcy-$1" >>"$LOG" 2>&1
    v image delete "gcx-$1" >>"$LOG" 2>&1
}
gc_run() { CMD=(gc); }
gc_after() {
    local id; id=$(img_id "gcy-$1")
    if [ "$1" = 0 ] && ! echo "$MEAS_OUT" | grep -q 'repacked [1-9]'; then note "measure gc repacked nothing: $MEAS_OUT"; fi
    common_checks "$1" ${id:+"$id=$GC_Y_SHA"}
    v image delete "gcy-$1" >>"$LOG" 2>&1
}

cp_setup() { rm -rf "$W/target"; }
cp_run() { CMD=(image copy data --to-depot "$W/target"); }
cp_after() {
    common_checks "$1"
    if [ -d "$W/target" ]; then
        check_fsck "$W/target" "$1 (target)"
        local id; id=$("$V" --depot "$W/target" image list --json --all 2>/dev/null | python3 -c 'import json,sys
for i in json.load(sys.stdin): print(i["id"])')
        check_images "$W/target" "$1 (target)" ${id:+"$id=$DATA_SHA"}
        [ "$2" = done ] && [ -z "$id" ] && note "round $1: copy finished but target has no image"
    fi
}

cap_setup() { ensure_vm stopped; }
cap_run() { CMD=(image create --from-instance vm --name "cap-$1"); }
cap_after() { common_checks "$1"; drop_new; }
live_setup() { ensure_vm running; }
live_run() { CMD=(image create --from-instance vm --name "live-$1" --live); }
live_after() { common_checks "$1"; drop_new; }

exp_setup() { rm -f "$W/out.raw"; }
exp_run() { CMD=(image export data "$W/out.raw"); }
exp_after() {
    common_checks "$1"
    if [ -e "$W/out.raw" ] && [ "$(sha256sum <"$W/out.raw" | cut -d' ' -f1)" != "$DATA_SHA" ]; then
        [ "$2" = done ] && note "round $1: finished export has other bytes" || EXP_PARTIAL=$((EXP_PARTIAL + 1))
    fi
}

bk_setup() { ensure_vm running; }
bk_run() { CMD=(instance backup vm); }
bk_after() { common_checks "$1"; drop_new; }

# restore of a stopped instance: on a running one it restarts the guest, and
# this guest ignores the ACPI power button, so that takes the 60 s stop timeout
rs_setup() { ensure_vm stopped; }
rs_run() { CMD=(instance restore vm --from golden); }
rs_after() {
    common_checks "$1"
    local st; st=$(v instance show vm --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null)
    [ "$st" = stopped ] || RS_NOTRUN=$((RS_NOTRUN + 1))
}

# ---- main -------------------------------------------------------------------
[ -x "$V" ] || { echo "no binary $V (cargo build --release)" >&2; exit 1; }
[ -r "$GUEST" ] || { echo "no guest $GUEST" >&2; exit 1; }
echo "work dir $W, N=$N, log $LOG" >&2
v image import "$GUEST" --name guest >>"$LOG" 2>&1 || { echo "guest import failed" >&2; exit 1; }
mkdata "$W/data.raw"; DATA_SHA=$(sha256sum <"$W/data.raw" | cut -d' ' -f1)
v image import "$W/data.raw" --name data >>"$LOG" 2>&1 || { echo "data import failed" >&2; exit 1; }
v instance run guest --name vm --accel tcg --memory 256M >>"$LOG" 2>&1 || { echo "instance run failed" >&2; exit 1; }
sleep 5
v image create --from-instance vm --name golden --live >>"$LOG" 2>&1 || { echo "golden capture failed" >&2; exit 1; }

EXP_PARTIAL=0; RS_NOTRUN=0
op "import raw"            imp_setup  imp_run  imp_after
op "import qcow2"          q2_setup   q2_run   q2_after
op "gc (repack)"           gc_setup   gc_run   gc_after
op "image copy"            cp_setup   cp_run   cp_after
op "capture stopped"       cap_setup  cap_run  cap_after
op "capture live"          live_setup live_run live_after
op "image export"          exp_setup  exp_run  exp_after
ROWS[-1]="${ROWS[-1]}; partial out.raw left at the destination after $EXP_PARTIAL kills"
op "instance backup"       bk_setup   bk_run   bk_after
op "instance restore"      rs_setup   rs_run   rs_after
ROWS[-1]="${ROWS[-1]}; stopped instance; not stopped after $RS_NOTRUN kills"

# ---- the end: delete everything, gc, nothing may be left ---------------------
v instance stop vm --force >>"$LOG" 2>&1
v instance delete vm --force >>"$LOG" 2>&1
for id in $(v image list --json --all 2>/dev/null | python3 -c 'import json,sys
for i in json.load(sys.stdin): print(i["id"])'); do
    v image delete "$id" --force >>"$LOG" 2>&1
done
v gc >>"$LOG" 2>&1
STORED=$(v stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])')
PACKS=$(find "$VMDEPOT_DIR/packs" -name '*.pack' | wc -l)
FINAL_FSCK=$(v fsck --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["problems"]), len(d["garbage"]))')

printf '\n| operation | kills | fsck clean | images intact | guests paused | notes |\n|---|---|---|---|---|---|\n'
for row in "${ROWS[@]}"; do echo "| ${row//|/ | } |"; done
echo
if [ "$STORED" = 0 ] && [ "$PACKS" = 0 ]; then
    echo "gc leaks 0 bytes (stored_bytes 0, 0 pack files; fsck problems/garbage: $FINAL_FSCK)"
else
    echo "gc LEAKS: stored_bytes $STORED, $PACKS pack files left (fsck problems/garbage: $FINAL_FSCK)"
fi
