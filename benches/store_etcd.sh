#!/usr/bin/env bash
# The etcd store against the embedded one, in one run: submissions per second from 4 shells
# (the node drained, so nothing runs) and `cat nodes/<n>/sitrep` latency, on the embedded
# store's head, on a head of the etcd store that leads, and on a second head of that store
# that does not (it makes every operation on the leading one); prints Markdown.
#   BENCH_STORE_JOBS=2000 BENCH_STORE_READS=2000 benches/store_etcd.sh
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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A 3-member etcd cluster on loopback ports, data on this machine's disk.
clients=() peers=() initial=()
for i in 0 1 2; do clients+=("$(free_port)"); peers+=("$(free_port)"); done
for i in 0 1 2; do initial+=("m$i=http://127.0.0.1:${peers[$i]}"); done
for i in 0 1 2; do
  etcd --name "m$i" --data-dir "$work/etcd-m$i" \
    --listen-client-urls "http://127.0.0.1:${clients[$i]}" --advertise-client-urls "http://127.0.0.1:${clients[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${peers[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${peers[$i]}" \
    --initial-cluster "$(IFS=,; echo "${initial[*]}")" --initial-cluster-state new \
    --initial-cluster-token "bench-$$" > "$work/etcd-m$i.log" 2>&1 &
  pids+=($!)
done
store="etcd://127.0.0.1:${clients[0]},127.0.0.1:${clients[1]},127.0.0.1:${clients[2]}/bench"

# submit MNT: N jobs from 4 shells; prints the seconds.
submit4() {
  local per=$((N / 4)) t0 t1
  t0=$(now)
  for s in 1 2 3 4; do
    ( for ((i = 0; i < per; i++)); do echo true > "$1/jobs/new"; done ) &
  done
  wait
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}

# reads MNT: p50 and p99 of READS sitrep reads, in ms.
reads() {
  python3 - "$1/nodes/bn0/sitrep" "$READS" <<'PY'
import sys, time
path, n = sys.argv[1], int(sys.argv[2])
t = []
for _ in range(n):
    a = time.perf_counter()
    with open(path) as f:
        f.read()
    t.append((time.perf_counter() - a) * 1000)
t.sort()
print(f"{t[len(t) // 2]:.3f} {t[int(len(t) * 0.99)]:.3f}")
PY
}

declare -A submit p50 p99
want=0
for kind in embedded etcd follower; do
  mkdir -p "$work/mnt-$kind"
  case $kind in
    embedded) args=(up --nodes bn0) want=$N ;;
    etcd) args=(up --nodes bn0 --store "$store") want=$N ;;
    # The second head of the etcd store: the jobs it takes join the leading head's queue.
    follower) args=(mount --store "$store") want=$((2 * N)) ;;
  esac
  target/release/clusterfs "${args[0]}" "$work/mnt-$kind" "${args[@]:1}" --state "$work/state-$kind" \
    --listen 127.0.0.1:0 > "$work/head-$kind.log" 2>&1 &
  pids+=($!)
  # The second head shows the node the leading head drained.
  wait_up "$work/mnt-$kind" bn0 "$([ $kind = follower ] && echo drained || echo up)"
  echo "drain store benchmark" > "$work/mnt-$kind/nodes/bn0/ctl"
  submit[$kind]=$(submit4 "$work/mnt-$kind")
  queued=$(grep -c . "$work/mnt-$kind/jobs/queue" || true)
  [ "$queued" -eq "$want" ] || { echo "store_etcd: $kind queued $queued of $want" >&2; exit 1; }
  read -r p50[$kind] p99[$kind] < <(reads "$work/mnt-$kind")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
rate() { awk -v n="$N" -v t="$1" 'BEGIN { printf "%.0f", n / t }'; }
cat <<MD
## Store: etcd (3 members) against embedded, $N submissions, $READS sitrep reads

| store | submit $N (s) | submissions/s | \`cat sitrep\` p50 (ms) | p99 (ms) |
|---|---|---|---|---|
| embedded (redb) | ${submit[embedded]} | $(rate "${submit[embedded]}") | ${p50[embedded]} | ${p99[embedded]} |
| etcd, the leading head | ${submit[etcd]} | $(rate "${submit[etcd]}") | ${p50[etcd]} | ${p99[etcd]} |
| etcd, a second head (not leading) | ${submit[follower]} | $(rate "${submit[follower]}") | ${p50[follower]} | ${p99[follower]} |
| **ratio** etcd leader / embedded | **$(ratio "${submit[etcd]}" "${submit[embedded]}")** (time) | | **$(ratio "${p50[etcd]}" "${p50[embedded]}")** | $(ratio "${p99[etcd]}" "${p99[embedded]}") |
| **ratio** second head / embedded | **$(ratio "${submit[follower]}" "${submit[embedded]}")** (time) | | **$(ratio "${p50[follower]}" "${p50[embedded]}")** | $(ratio "${p99[follower]}" "${p99[embedded]}") |
MD
