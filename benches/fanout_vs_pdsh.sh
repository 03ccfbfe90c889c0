#!/usr/bin/env bash
# Runs `hostname` on BENCH_FANOUT_NODES node names with clusterfs (one multi-node job), pdsh and
# clush (exec mode, fanout 64), and forks the same count of bare `sh -c hostname` (the floor),
# in one run; prints a Markdown table with each time as a ratio of the floor.
#   BENCH_FANOUT_NODES=1000 BENCH_ROUNDS=3 benches/fanout_vs_pdsh.sh
#   BENCH_TMP=/dev/shm puts the head's and the agent's state on tmpfs.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_FANOUT_NODES:-1000}
ROUNDS=${BENCH_ROUNDS:-3}
set_="sim[0-$((N - 1))]"
source benches/lib.sh
bench_work clusterfs-bench "${BENCH_TMP:-/tmp}"

# best CMD: the shortest of ROUNDS timed runs of CMD, in seconds.
best() {
  local b="" t0 t1 d
  for _ in $(seq 1 "$ROUNDS"); do
    t0=$(now)
    eval "$1" > /dev/null
    t1=$(now)
    d=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    if [ -z "$b" ] || awk -v d="$d" -v b="$b" 'BEGIN { exit !(d < b) }'; then b=$d; fi
  done
  echo "$b"
}

mkdir -p "$work/mnt"
printf '[head]\nnodeset_limit = 100000\n' > "$work/config.toml"
target/release/clusterfs up "$work/mnt" --nodes "$set_" --state "$work/state" --listen 127.0.0.1:0 \
  --config "$work/config.toml" > /dev/null 2> "$work/head.log" &
head=$!
wait_up "$work/mnt" "$set_"
# One job: submit, read the id back, wait for it (the whole round trip a script sees).
ours() {
  local id
  exec 3<> "$work/mnt/jobs/new"
  printf '#CLUSTER nodes=%s isolate=none\nhostname\n' "$set_" >&3
  read -r id <&3
  exec 3>&-
  cat "$work/mnt/jobs/$id/wait"
  grep -q "SUM: $N\$" "$work/mnt/jobs/$id/summary" || { echo "job $id: $(cat "$work/mnt/jobs/$id/summary")" >&2; exit 1; }
}
floor=$(best "for i in \$(seq 1 $N); do sh -c hostname; done")
t_ours=$(best ours)
t_ours_ns=$(best "exec 3<> $work/mnt/jobs/new; printf '#CLUSTER nodes=%s\nhostname\n' '$set_' >&3; read -r id <&3; exec 3>&-; cat $work/mnt/jobs/\$id/wait")
t_pdsh=$(best "pdsh -R exec -f 64 -w '$set_' hostname")
t_clush=$(best "clush -R exec -f 64 -w '$set_' hostname")
ratio() { awk -v a="$1" -v b="$floor" 'BEGIN { printf "%.2fx", a / b }'; }
cat <<EOF
## Fan-out: \`hostname\` on $N node names

Best of $ROUNDS rounds each, same machine, same run. clusterfs: one job \`nodes=$set_\` served by
one \`clusterfs-agent --nodes\` process, from the write to \`jobs/new\` to its \`wait\` returning
(every node's output gathered and its exit stored). Floor: $N sequential \`sh -c hostname\`.

| | seconds | vs floor |
|---|---|---|
| fork floor | $floor | 1.00x |
| clusterfs, isolate=none | $t_ours | $(ratio "$t_ours") |
| clusterfs, isolate=ns (default) | $t_ours_ns | $(ratio "$t_ours_ns") |
| pdsh -R exec -f 64 | $t_pdsh | $(ratio "$t_pdsh") |
| clush -R exec -f 64 ($(clush --version 2>&1 | awk '{print $2}')) | $t_clush | $(ratio "$t_clush") |
EOF
