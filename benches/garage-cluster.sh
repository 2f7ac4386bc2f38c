#!/usr/bin/env bash
# A 3-node Garage cluster on loopback, one node per zone (dc1, dc2, dc3),
# replication factor 3, for the remote benchmarks (the tests start their
# own, tests/it/garage.rs; docs/GARAGE.md has the recipe).
#   garage-cluster.sh start DIR [BASEPORT]   -> writes DIR/env (endpoint, key, bucket)
#   garage-cluster.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?DIR}
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$cmd" = stop ]; then
    for p in "$dir"/node*/pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
    exit 0
fi
base=${3:-39100}
mkdir -p "$dir"
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
for i in 1 2 3; do
    n="$dir/node$i"; mkdir -p "$n/meta" "$n/data"
    rpc=$((base + 10 * i)); s3=$((rpc + 1)); admin=$((rpc + 2))
    cat > "$n/garage.toml" <<CONF
metadata_dir = "$n/meta"
data_dir = "$n/data"
db_engine = "lmdb"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
CONF
    garage -c "$n/garage.toml" server > "$n/log" 2>&1 &
    echo $! > "$n/pid"
done
g() { garage -c "$dir/node1/garage.toml" "$@"; }
for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.1; done
for i in 2 3; do
    id=$(garage -c "$dir/node$i/garage.toml" node id -q 2>/dev/null)
    g node connect "$id" >/dev/null
done
for i in 1 2 3; do
    id=$(garage -c "$dir/node$i/garage.toml" node id -q 2>/dev/null | cut -d@ -f1)
    g layout assign -z "dc$i" -c 10G "$id" >/dev/null
done
g layout apply --version 1 >/dev/null
g key create bench-key > "$dir/key.txt"
key=$(sed -n 's/^Key ID: *//p' "$dir/key.txt")
sec=$(sed -n 's/^Secret key: *//p' "$dir/key.txt")
for b in vmdepot restic plain; do
    g bucket create "$b" >/dev/null
    g bucket allow --read --write --owner "$b" --key bench-key >/dev/null
done
cat > "$dir/env" <<ENV
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$sec
export AWS_REGION=garage
export AWS_DEFAULT_REGION=garage
export GARAGE_ENDPOINT=http://127.0.0.1:$((base + 11))
ENV
