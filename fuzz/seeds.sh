#!/usr/bin/env bash
# Writes the fuzz seeds into fuzz/seeds/<target>/ (git-ignored: no binary
# is committed). Images come from qemu-img (small ones: the header checks
# read at most the first 4 KiB, the last 512 bytes and a VMDK's embedded
# descriptor); image maps and pack frames from vmdepot itself (mkseeds:
# an import of a generated raw disk into a throw-away depot).
# Needs qemu-img (Debian: qemu-utils) and cargo-afl (see run.sh).
set -euo pipefail
cd "$(dirname "$0")"
S=seeds
rm -rf "$S"
mkdir -p "$S"/{source_any,source_qcow2,source_vmdk,source_vhd}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
q() { qemu-img create -q "$@"; }

# qcow2: v2, v3, v3 with header extensions, and the refused kinds.
q -f qcow2 -o compat=0.10,cluster_size=4096 "$T/v2.qcow2" 1M
q -f qcow2 -o compat=1.1,cluster_size=4096 "$T/v3.qcow2" 1M
q -f qcow2 -o compat=1.1,cluster_size=4096,lazy_refcounts=on "$T/lazy.qcow2" 1M
q -f qcow2 -o compat=1.1,cluster_size=4096,refcount_bits=1 "$T/refcount1.qcow2" 1M
q -f qcow2 -o cluster_size=4096 -b "$T/v3.qcow2" -F qcow2 "$T/backing.qcow2"
q -f qcow2 -o cluster_size=4096,data_file="$T/data.raw" "$T/datafile.qcow2" 1M
cp "$T"/{v2,v3,lazy,refcount1,backing,datafile}.qcow2 "$S/source_qcow2/"

# vmdk: the two accepted subformats, and a descriptor (refused).
q -f vmdk -o subformat=monolithicSparse "$T/sparse.vmdk" 1M
q -f vmdk -o subformat=streamOptimized "$T/stream.vmdk" 1M
q -f vmdk -o subformat=monolithicFlat "$T/flat.vmdk" 64K
cp "$T"/{sparse,stream}.vmdk "$S/source_vmdk/"

# vhd (qemu's vpc): dynamic (footer copy at the start) and fixed (footer
# at the end only).
q -f vpc -o subformat=dynamic "$T/dynamic.vhd" 1M
q -f vpc -o subformat=fixed "$T/fixed.vhd" 64K
cp "$T"/{dynamic,fixed}.vhd "$S/source_vhd/"

# vhdx is only detected (qemu-img checks it): its first 64 KiB will do.
q -f vhdx "$T/full.vhdx" 1M
head -c 65536 "$T/full.vhdx" > "$T/head.vhdx"
# detected and refused: vdi, qed; and a plain raw disk.
q -f vdi "$T/disk.vdi" 1M
q -f qed "$T/full.qed" 1M
head -c 4096 "$T/full.qed" > "$T/disk.qed"
head -c 8192 /dev/urandom > "$T/disk.raw"

cp "$S"/source_{qcow2,vmdk,vhd}/* "$S/source_any/"
cp "$T"/{flat.vmdk,head.vhdx,disk.vdi,disk.qed,disk.raw} "$S/source_any/"

# vmdepot's own map and pack seeds.
cargo afl build --release --quiet --bin mkseeds
target/release/mkseeds "$S"

for d in "$S"/*/; do
    find "$d" -type f -size +1M -exec sh -c 'echo "seeds.sh: $1 is over AFL'"'"'s 1 MiB input limit" >&2; exit 1' _ {} \;
    printf '%-14s %2d seeds, %s\n' "$(basename "$d")" "$(ls "$d" | wc -l)" "$(du -sh "$d" | cut -f1)"
done
