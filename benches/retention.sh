#!/usr/bin/env bash
# The head's CPU per job on a fresh head, and again once BENCH_RETAINED jobs have ended and are
# kept for retention (the default keeps 7 days of them): what a scheduler pass costs should not
# grow with the jobs it keeps. 4 node names on this host; trivial jobs from 4 shells; the head's
# CPU from /proc/<pid>/stat over BENCH_SAMPLE jobs each time. Prints a Markdown table.
#   BENCH_RETAINED=20000 BENCH_SAMPLE=600 benches/retention.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RETAINED=${BENCH_RETAINED:-20000}
SAMPLE=${BENCH_SAMPLE:-600}
source benches/lib.sh
bench_work clusterfs-retention
mkdir -p "$work/mnt"
target/release/clusterfs up "$work/mnt" --nodes "rn[1-4]" --state "$work/state" --listen 127.0.0.1:0 \
  > /dev/null 2> "$work/head.log" &
head=$!
wait_up "$work/mnt" "rn[1-4]"
# Submits $1 jobs from 4 shells and waits until none is queued or running.
run() {
  local pids=""
  for _ in 1 2 3 4; do
    (for ((i = 0; i < $1 / 4; i++)); do echo true > "$work/mnt/jobs/new"; done) &
    pids="$pids $!"
  done
  # shellcheck disable=SC2086 # one pid per word
  wait $pids
  while [ "$(grep -c . "$work/mnt/jobs/queue" || true)" -ne 0 ]; do sleep 0.1; done
}
# The head's CPU in ms per job over a run of $1 jobs.
cpu_per_job() {
  local before after
  before=$(awk '{print $14 + $15}' "/proc/$head/stat")
  run "$1"
  after=$(awk '{print $14 + $15}' "/proc/$head/stat")
  awk -v a="$before" -v b="$after" -v n="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) * 1000 / hz / n }'
}
fresh=$(cpu_per_job "$SAMPLE")
run "$RETAINED"
kept=$(cpu_per_job "$SAMPLE")
echo "| head CPU per job | fresh head | with $RETAINED ended jobs kept | ratio |"
echo "|---|---|---|---|"
awk -v f="$fresh" -v k="$kept" 'BEGIN { printf "| ms | %.2f | %.2f | **%.2fx** |\n", f, k, k / f }'
