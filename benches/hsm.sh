#!/usr/bin/env bash
# Queues BENCH_HSM_REQUESTS (default 100,000) Lustre active_requests lines in one write into
# hsm/queue, with 8 movers (one agent process serving mv[1-8], POSIX backend, zero-byte
# files): the time to accept them (write and close of hsm/queue) and the time until every
# request is assigned (sent to a mover), then done. Goals: accept < 2 s, assign < 10 s.
# There is no Lustre here, so coordinatool cannot run beside it: the goals are absolute.
#   BENCH_HSM_REQUESTS=100000 benches/hsm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_HSM_REQUESTS:-100000}
source benches/lib.sh
bench_work clusterfs-bench-hsm
bench_cleanup() { [ -n "${agent:-}" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null; }

mkdir -p "$work/lustre/.lustre/fid" "$work/archive" "$work/mnt"
python3 - "$work" "$N" <<'PY'
import os, sys
work, n = sys.argv[1], int(sys.argv[2])
fids = os.path.join(work, "lustre/.lustre/fid")
with open(os.path.join(work, "requests"), "w") as out:
    out.write("mdt.lustre0-MDT0000.hsm.active_requests=\n")
    for i in range(1, n + 1):
        fid = "[0x200000401:%#x:0x0]" % i
        open(os.path.join(fids, fid), "w").close()
        out.write("fid=%s dfid=%s compound/cookie=0x0/%#x action=ARCHIVE archive#=1 flags=0x0 "
                  "extent=0x0-0xffffffffffffffff gid=0x0 data=[7461673D62656E6368] canceled=0 "
                  "uuid=bench done=0\n" % (fid, fid, i))
PY
target/release/clusterfs up "$work/mnt" --nodes bench0 --state "$work/state" --listen 127.0.0.1:0 \
  > /dev/null 2> "$work/head.log" &
head=$!
wait_up "$work/mnt" bench0
target/release/clusterfs-agent --nodes 'mv[1-8]' --head "$(cat "$work/state/head.addr")" \
  --secret-file "$work/state/secret" --state "$work/agents" --mover --lustre-root "$work/lustre" \
  --archive-root "$work/archive/%n" 2> "$work/agent.log" &
agent=$!
for _ in $(seq 1 300); do [ "$(grep -c '^mover mv.* up ' "$work/mnt/hsm/status" 2>/dev/null)" = 8 ] && break; sleep 0.1; done

t0=$(now)
cat "$work/requests" > "$work/mnt/hsm/queue"
accept=$(elapsed "$t0")
until grep -q '^archive queued 0 ' "$work/mnt/hsm/status"; do sleep 0.05; done
assigned=$(elapsed "$t0")
until grep -q '^archive queued 0 running 0 ' "$work/mnt/hsm/status"; do sleep 0.2; done
done_s=$(elapsed "$t0")
archived=$(find "$work/archive" -type f | wc -l)
echo
echo "### HSM: $N active_requests lines in one write, 8 movers (\`BENCH_HSM_REQUESTS=$N benches/hsm.sh\`)"
echo
echo "| step | seconds | goal |"
echo "|---|---|---|"
echo "| accepted (write + close of hsm/queue) | $accept | < 2 |"
echo "| all assigned to a mover | $assigned | < 10 |"
echo "| all done (zero-byte archive copies) | $done_s | - |"
echo
echo "Archive copies made: $archived of $N."
