#!/usr/bin/env bash
# Failover with a large queue: two heads on a 3-member etcd, BENCH_TAKEOVER_JOBS jobs queued
# (the node drained, so nothing runs), then the leading head SIGKILLed. Prints Markdown: how
# long until the other head took a write, how long its load of the cluster took, how much
# memory its copy of the store held while it followed, and that every job was there.
#   BENCH_TAKEOVER_JOBS=100000 benches/takeover_etcd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_TAKEOVER_JOBS:-100000}
SHELLS=16
source benches/lib.sh
bench_work clusterfs-takeover
pids=()
bench_cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null; wait "${pids[$i]}" 2>/dev/null; done
}
bench_etcd takeover

# The first head leads (it starts first and the node's agent runs with it); the second follows.
for kind in leader follower; do
  mkdir -p "$work/mnt-$kind"
  case $kind in
    leader) args=(up "$work/mnt-$kind" --nodes bn0) ;;
    follower) args=(mount "$work/mnt-$kind") ;;
  esac
  target/release/clusterfs "${args[@]}" --store "$store" --state "$work/state-$kind" --listen 127.0.0.1:0 \
    > "$work/head-$kind.log" 2>&1 &
  pids+=($!)
  wait_up "$work/mnt-$kind" bn0 "$([ $kind = leader ] && echo up || echo drained)"
  [ $kind = follower ] || echo "drain takeover benchmark" > "$work/mnt-leader/nodes/bn0/ctl"
done
leader=${pids[-2]} follower=${pids[-1]}

t0=$(now)
shells=()
for ((s = 0; s < SHELLS; s++)); do
  ( for ((i = 0; i < N / SHELLS; i++)); do echo true > "$work/mnt-leader/jobs/new"; done ) &
  shells+=($!)
done
wait "${shells[@]}"
queued_in=$(elapsed "$t0")
n=$((N / SHELLS * SHELLS))
sleep 2
copy_kb=$(ps -o rss= -p "$follower")

kill -9 "$leader"
t0=$(now)
{ wait "$leader"; } 2> /dev/null || true
until echo bn0 > "$work/mnt-follower/groups/after" 2> /dev/null; do sleep 0.01; done
took=$(elapsed "$t0")
load_ms=$(grep -o 'loaded the cluster from the store took_ms=[0-9]*' "$work/head-follower.log" | grep -o '[0-9]*$')
from_copy=$(grep -c "scans read this head's copy of the store: dropped it" "$work/head-follower.log" || true)
queued=$(grep -c . "$work/mnt-follower/jobs/queue" || true)
[ "$queued" -eq "$n" ] || { echo "takeover_etcd: the new leader queues $queued of $n" >&2; exit 1; }
cat <<MD
## Failover with $n jobs queued: two heads on etcd (3 members), the leader SIGKILLed (lease_ttl_s = 3)

| jobs queued | queued in (s) | second head's RSS while it follows (MB) | a write taken after the kill (s) | loading the cluster (ms) | loaded from its copy | jobs the new leader queues |
|---|---|---|---|---|---|---|
| $n | $queued_in | $((copy_kb / 1024)) | $took | $load_ms | $([ "$from_copy" -ge 1 ] && echo yes || echo no) | $queued |
MD
