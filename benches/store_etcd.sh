#!/usr/bin/env bash
# The etcd store against the embedded one, in one run: submissions per second (the node drained,
# so nothing runs) from 4, 16 and 32 shells (BENCH_STORE_SHELLS), and `cat nodes/<n>/sitrep`
# latency, on the embedded store's head, on a head of the etcd store that leads, and on a second
# head of that store that does not (it asks the leading one for each operation but a node's
# sitrep and state, which it serves from what the leading head sends); prints Markdown.
# A few shells measure how long one submission waits (each waits for its commit before its next);
# many measure how many submissions a head takes: each store's best rate is its capacity.
# The three heads run side by side: submissions alternate in rounds, reads take turns in every
# order, then again with each head pinned to one CPU and the reader to another, then alone.
#   BENCH_STORE_JOBS=2000 BENCH_STORE_READS=2000 BENCH_STORE_ROUNDS=4 BENCH_STORE_SETTLE=20 benches/store_etcd.sh
#   BENCH_STORE_SHELLS="4 16 32" (each count submits BENCH_STORE_JOBS jobs to each head)
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

# submit MNT COUNT SHELLS: COUNT jobs from SHELLS shells; prints the seconds.
submit() {
  local per=$(($2 / $3)) t0 t1
  t0=$(now)
  for ((s = 0; s < $3; s++)); do
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

# Submissions in alternating rounds, so that a slow minute of the machine falls on every side;
# every count of shells in turn.
ROUNDS=${BENCH_STORE_ROUNDS:-4}
read -r -a shells <<< "${BENCH_STORE_SHELLS:-4 16 32}"
declare -A submit sent
for kind in "${kinds[@]}"; do sent[$kind]=0; done
for sh in "${shells[@]}"; do
  per_round=$(((N / ROUNDS / sh) * sh))
  for kind in "${kinds[@]}"; do submit[$kind,$sh]=0; done
  for ((r = 0; r < ROUNDS; r++)); do
    for kind in "${kinds[@]}"; do
      t=$(submit "$work/mnt-$kind" "$per_round" "$sh")
      submit[$kind,$sh]=$(awk -v a="${submit[$kind,$sh]}" -v b="$t" 'BEGIN { printf "%.3f", a + b }')
      sent[$kind]=$((sent[$kind] + per_round))
    done
  done
  submit[n,$sh]=$((per_round * ROUNDS))
done
for kind in embedded etcd; do
  want=$([ $kind = etcd ] && echo $((sent[etcd] + sent[follower])) || echo "${sent[embedded]}")
  queued=$(grep -c . "$work/mnt-$kind/jobs/queue" || true)
  [ "$queued" -eq "$want" ] || { echo "store_etcd: $kind queued $queued of $want" >&2; exit 1; }
done

# Reads of each mount's sitrep; prints p50 and p99 (ms) for each mount. `turn`: one mount after
# the other, in every order in turn (none always follows another's read); `alone`: a run of
# reads of one mount, then of the next, the mounts in every order in turn.
reads() {
  python3 - "$1" "$READS" "$work/mnt-embedded" "$work/mnt-etcd" "$work/mnt-follower" <<'PY'
import itertools, sys, time
mode, n, mounts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
paths = [m + "/nodes/bn0/sitrep" for m in mounts]
times = [[] for _ in paths]
def read(i):
    a = time.perf_counter()
    with open(paths[i]) as f:
        f.read()
    times[i].append((time.perf_counter() - a) * 1000)
if mode == "turn":
    orders = list(itertools.permutations(range(len(paths))))
    for b in range(4 * len(orders)):
        for _ in range(n // (4 * len(orders))):
            for i in orders[b % len(orders)]:
                read(i)
else:
    orders = list(itertools.permutations(range(len(paths))))
    for order in orders:
        for i in order:
            for _ in range(n // len(orders)):
                read(i)
out = []
for t in times:
    t.sort()
    out += [f"{t[len(t) // 2]:.3f}", f"{t[int(len(t) * 0.99)]:.3f}"]
print(" ".join(out))
PY
}
# Which head a reader in turn waits for most depends on where the scheduler placed each one's
# threads against the reader's: that changes from run to run, whatever the store. So the reads
# in turn are also made with every head (and etcd) on the last CPU and the reader on the first:
# the same placement for all three.
pin() {
  local p
  for p in "${pids[@]}" $(for p in "${pids[@]}"; do pgrep -P "$p"; done); do taskset -a -p -c "$1" "$p" > /dev/null; done
}
# A head that has just taken thousands of submissions answers reads more slowly for some
# seconds (seen on each kind of head, the embedded one too): the reads wait until all three
# have been idle as long.
sleep "${BENCH_STORE_SETTLE:-20}"
declare -A p50 p99 alone pinned
read -r -a turn < <(reads turn)
read -r -a solo < <(reads alone)
last=$(($(nproc) - 1))
if [ "$last" -gt 0 ]; then
  pin "$last"
  read -r -a tied < <(taskset -c 0 bash -c "$(declare -f reads); work=$work READS=$READS reads turn")
  pin "0-$last"
else
  tied=(- - - - - -)
fi
for i in 0 1 2; do
  k=${kinds[$i]}
  p50[$k]=${turn[$((2 * i))]} p99[$k]=${turn[$((2 * i + 1))]} alone[$k]=${solo[$((2 * i))]} pinned[$k]=${tied[$((2 * i))]}
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2fx", a / b; else printf "-" }'; }
# rate KIND SHELLS: submissions per second.
rate() { awk -v n="${submit[n,$2]}" -v t="${submit[$1,$2]}" 'BEGIN { printf "%.0f", n / t }'; }
# best KIND: the best rate over the counts of shells, and that count.
best() {
  local sh
  for sh in "${shells[@]}"; do echo "$(rate "$1" "$sh") $sh"; done | sort -g -r | head -1
}
echo "## Store: etcd (3 members) against embedded: submissions from ${shells[*]} shells, $N each to each head in $ROUNDS alternating rounds; $READS sitrep reads each in turn"
echo
echo "| shells | embedded: submissions/s | etcd leader: submissions/s | **ratio** (time) | second head: submissions/s | ratio |"
echo "|---|---|---|---|---|---|"
for sh in "${shells[@]}"; do
  e=$(rate embedded "$sh") l=$(rate etcd "$sh") f=$(rate follower "$sh")
  echo "| $sh | $e | $l | **$(ratio "$e" "$l")** | $f | $(ratio "$e" "$f") |"
done
read -r be bes < <(best embedded)
read -r bl bls < <(best etcd)
read -r bf bfs < <(best follower)
echo "| **best** (capacity) | $be ($bes shells) | $bl ($bls shells) | **$(ratio "$be" "$bl")** | $bf ($bfs shells) | $(ratio "$be" "$bf") |"
cat <<MD

| store | \`cat sitrep\` p50 (ms) | p99 (ms) | p50 pinned (ms) | p50 alone (ms) |
|---|---|---|---|---|
| embedded (redb) | ${p50[embedded]} | ${p99[embedded]} | ${pinned[embedded]} | ${alone[embedded]} |
| etcd, the leading head | ${p50[etcd]} | ${p99[etcd]} | ${pinned[etcd]} | ${alone[etcd]} |
| etcd, a second head (not leading) | ${p50[follower]} | ${p99[follower]} | ${pinned[follower]} | ${alone[follower]} |
| **ratio** etcd leader / embedded | **$(ratio "${p50[etcd]}" "${p50[embedded]}")** | $(ratio "${p99[etcd]}" "${p99[embedded]}") | $(ratio "${pinned[etcd]}" "${pinned[embedded]}") | $(ratio "${alone[etcd]}" "${alone[embedded]}") |
| **ratio** second head / embedded | **$(ratio "${p50[follower]}" "${p50[embedded]}")** | $(ratio "${p99[follower]}" "${p99[embedded]}") | $(ratio "${pinned[follower]}" "${pinned[embedded]}") | $(ratio "${alone[follower]}" "${alone[embedded]}") |
MD
