#!/usr/bin/env bash
# The etcd store against the embedded one, in one run: submissions per second from 4 shells
# (BENCH_STORE_SHELLS; the node drained, so nothing runs) and `cat nodes/<n>/sitrep` latency,
# on the embedded store's head, on a head of the etcd store that leads, and on a second head
# of that store that does not (it asks the leading one for each operation but a node's sitrep
# and state, which it serves from what the leading head sends); prints Markdown.
# The three heads run side by side: submissions alternate in rounds, reads take turns.
#   BENCH_STORE_JOBS=2000 BENCH_STORE_READS=2000 BENCH_STORE_ROUNDS=4 benches/store_etcd.sh
#   BENCH_STORE_TMP=/dev/shm puts both stores (and etcd's data) on tmpfs: no fsync cost either side.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_STORE_JOBS:-2000}
READS=${BENCH_STORE_READS:-2000}
source benches/lib.sh
bench_work clusterfs-bench "${BENCH_STORE_TMP:-/tmp}"
pids=()
bench_cleanup() {
  # Heads first (the last started), then the etcd members they use.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null; wait "${pids[$i]}" 2>/dev/null; done
}

bench_etcd bench

# submit MNT COUNT: COUNT jobs from $SHELLS shells; prints the seconds.
SHELLS=${BENCH_STORE_SHELLS:-4}
submit() {
  local per=$(($2 / SHELLS)) t0 t1
  t0=$(now)
  for ((s = 0; s < SHELLS; s++)); do
    ( for ((i = 0; i < per; i++)); do echo true > "$1/jobs/new"; done ) &
  done
  wait
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

# All three heads run through the whole measurement: the embedded store's, the etcd store's
# first (it leads), and a second head of the etcd store (it does not lead: the jobs it takes
# join the leading head's queue).
kinds=(embedded etcd follower)
for kind in "${kinds[@]}"; do
  mkdir -p "$work/mnt-$kind"
  case $kind in
    embedded) args=(up --nodes bn0) ;;
    etcd) args=(up --nodes bn0 --store "$store") ;;
    follower) args=(mount --store "$store") ;;
  esac
  target/release/clusterfs "${args[0]}" "$work/mnt-$kind" "${args[@]:1}" --state "$work/state-$kind" \
    --listen 127.0.0.1:0 > "$work/head-$kind.log" 2>&1 &
  pids+=($!)
  # The second head shows the node the leading head drained.
  wait_up "$work/mnt-$kind" bn0 "$([ $kind = follower ] && echo drained || echo up)"
  [ $kind = follower ] || echo "drain store benchmark" > "$work/mnt-$kind/nodes/bn0/ctl"
done

# Submissions in alternating rounds, so that a slow minute of the machine falls on every side.
ROUNDS=${BENCH_STORE_ROUNDS:-4}
declare -A submit
for kind in "${kinds[@]}"; do submit[$kind]=0; done
for ((r = 0; r < ROUNDS; r++)); do
  for kind in "${kinds[@]}"; do
    t=$(submit "$work/mnt-$kind" $((N / ROUNDS)))
    submit[$kind]=$(awk -v a="${submit[$kind]}" -v b="$t" 'BEGIN { printf "%.3f", a + b }')
  done
done
done_n=$(((N / ROUNDS / SHELLS) * SHELLS * ROUNDS))
for kind in embedded etcd; do
  want=$([ $kind = etcd ] && echo $((2 * done_n)) || echo $done_n)
  queued=$(grep -c . "$work/mnt-$kind/jobs/queue" || true)
  [ "$queued" -eq "$want" ] || { echo "store_etcd: $kind queued $queued of $want" >&2; exit 1; }
done

# Reads, one mount after the other, each first in turn: the same moments for all three. Then
# each mount's alone, one after the other (a head read in turn with others pays for waking up).
read -r -a lat < <(python3 - "$READS" "$work/mnt-embedded" "$work/mnt-etcd" "$work/mnt-follower" <<'PY'
import sys, time
n, mounts = int(sys.argv[1]), sys.argv[2:]
paths = [m + "/nodes/bn0/sitrep" for m in mounts]
times = [[] for _ in paths]
for k in range(n):
    # Each mount goes first in turn: none always follows another's read.
    for j in range(len(paths)):
        i = (j + k) % len(paths)
        path = paths[i]
        a = time.perf_counter()
        with open(path) as f:
            f.read()
        times[i].append((time.perf_counter() - a) * 1000)
out = []
for t in times:
    t.sort()
    out += [f"{t[len(t) // 2]:.3f}", f"{t[int(len(t) * 0.99)]:.3f}"]
for path in paths:
    alone = []
    for k in range(n):
        a = time.perf_counter()
        with open(path) as f:
            f.read()
        alone.append((time.perf_counter() - a) * 1000)
    alone.sort()
    out.append(f"{alone[len(alone) // 2]:.3f}")
print(" ".join(out))
PY
)
declare -A p50 p99 alone
for i in 0 1 2; do
  p50[${kinds[$i]}]=${lat[$((2 * i))]} p99[${kinds[$i]}]=${lat[$((2 * i + 1))]} alone[${kinds[$i]}]=${lat[$((6 + i))]}
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
rate() { awk -v n="$done_n" -v t="$1" 'BEGIN { printf "%.0f", n / t }'; }
cat <<MD
## Store: etcd (3 members) against embedded, $done_n submissions each from $SHELLS shells in $ROUNDS alternating rounds, $READS sitrep reads each in turn

| store | submit $done_n (s) | submissions/s | \`cat sitrep\` p50 (ms) | p99 (ms) | p50 alone (ms) |
|---|---|---|---|---|---|
| embedded (redb) | ${submit[embedded]} | $(rate "${submit[embedded]}") | ${p50[embedded]} | ${p99[embedded]} | ${alone[embedded]} |
| etcd, the leading head | ${submit[etcd]} | $(rate "${submit[etcd]}") | ${p50[etcd]} | ${p99[etcd]} | ${alone[etcd]} |
| etcd, a second head (not leading) | ${submit[follower]} | $(rate "${submit[follower]}") | ${p50[follower]} | ${p99[follower]} | ${alone[follower]} |
| **ratio** etcd leader / embedded | **$(ratio "${submit[etcd]}" "${submit[embedded]}")** (time) | | **$(ratio "${p50[etcd]}" "${p50[embedded]}")** | $(ratio "${p99[etcd]}" "${p99[embedded]}") | $(ratio "${alone[etcd]}" "${alone[embedded]}") |
| **ratio** second head / embedded | **$(ratio "${submit[follower]}" "${submit[embedded]}")** (time) | | **$(ratio "${p50[follower]}" "${p50[embedded]}")** | $(ratio "${p99[follower]}" "${p99[embedded]}") | $(ratio "${alone[follower]}" "${alone[embedded]}") |
MD
