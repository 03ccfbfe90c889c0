#!/usr/bin/env bash
# Submits BENCH_JOBS trivial jobs from 4 parallel shells to Slurm (sbatch --wrap) and to
# clusterfs (echo > jobs/new), same node count and cpus, in one run; prints a Markdown table.
#   BENCH_JOBS=5000 BENCH_NODES=4 BENCH_WAIT_S=900 benches/jobs_vs_slurm.sh
#   BENCH_TMP=/dev/shm puts both sides' state (clusterfs' head and agents, Slurm's spool) on tmpfs.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_JOBS:-5000}
NODES=${BENCH_NODES:-4}
WAIT_S=${BENCH_WAIT_S:-900}
CPUS=$(nproc)
source benches/lib.sh
bench_work clusterfs-bench "${BENCH_TMP:-/tmp}"
bench_cleanup() {
  [ -n "${SLURM_CONF:-}" ] && scancel --quiet --full --user=root 2>/dev/null
  pkill -f "slurmd -N bn" 2>/dev/null
  pkill -f "slurmctld -c -f $work" 2>/dev/null
}

rate() { awk -v n="$1" -v t="$2" 'BEGIN { printf "%.0f", (t > 0 ? n / t : 0) }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# submit CMD: runs CMD N/4 times in each of 4 background shells; prints the elapsed seconds.
submit4() {
  local per=$((N / 4)) t0 t1
  t0=$(now)
  for s in 1 2 3 4; do
    ( for ((i = 0; i < per; i++)); do eval "$1"; done ) &
  done
  wait
  t1=$(now)
  secs "$t0" "$t1"
}

# drain COUNT_CMD T0: waits until COUNT_CMD prints 0 (or WAIT_S passes); prints elapsed since T0
# and how many were left.
drain() {
  local left deadline=$(( $(date +%s) + WAIT_S ))
  while :; do
    left=$(eval "$1")
    [ "$left" -eq 0 ] && break
    [ "$(date +%s)" -ge "$deadline" ] && break
    sleep 0.2
  done
  echo "$(secs "$2" "$(now)") $left"
}

# --- Slurm: slurmctld and NODES slurmd on this host, one partition, no accounting.
export SLURM_CONF=$work/slurm.conf
mkdir -p "$work/ctld" /run/munge
cat > "$SLURM_CONF" <<EOF
ClusterName=bench
SlurmctldHost=localhost
SlurmctldPort=16817
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$work/ctld
SlurmdSpoolDir=$work/slurmd-%n
SlurmctldPidFile=$work/ctld.pid
SlurmdPidFile=$work/slurmd-%n.pid
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldLogFile=$work/ctld.log
SlurmdLogFile=$work/slurmd-%n.log
MaxJobCount=$((N * 2 + 1000))
MinJobAge=2
NodeName=bn[1-$NODES] NodeHostname=localhost Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
chown munge:munge /run/munge
pgrep -x munged > /dev/null || runuser -u munge -- /usr/sbin/munged
slurmctld -c -f "$SLURM_CONF"
for n in $(seq 1 "$NODES"); do slurmd -N "bn$n" -f "$SLURM_CONF"; done
for _ in $(seq 1 100); do
  [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ] && break
  sleep 0.2
done
slurm_version=$(sinfo --version)
t0=$(now)
slurm_submit=$(submit4 "sbatch -Q -o /dev/null --wrap true")
read -r slurm_all slurm_left < <(drain "squeue -h -t PD,R,CG | wc -l" "$t0")
scancel --quiet --user=root || true
pkill -f "slurmd -N bn" || true
pkill -f "slurmctld -c -f $work" || true
# Slurm's daemons save their state as they stop: the clusterfs half starts once they are gone.
for _ in $(seq 1 300); do
  pgrep -f "slurmd -N bn|slurmctld -c -f $work" > /dev/null || break
  sleep 0.1
done
unset SLURM_CONF

# --- clusterfs: a head with NODES local node names, release build.
mkdir -p "$work/mnt"
target/release/clusterfs up "$work/mnt" --nodes "cn[1-$NODES]" --state "$work/state" --listen 127.0.0.1:0 \
  > /dev/null 2> "$work/head.log" &
head=$!
wait_up "$work/mnt" "cn[1-$NODES]"
t0=$(now)
ours_submit=$(submit4 "echo true > $work/mnt/jobs/new")
read -r ours_all ours_left < <(drain "grep -c . $work/mnt/jobs/queue || true" "$t0")
ours_failed=$(grep -L '^done 0' "$work"/mnt/jobs/*/state 2>/dev/null | wc -l)

slurm_done=$((N - slurm_left))
ours_done=$((N - ours_left))
cat <<EOF
## Jobs: clusterfs vs Slurm ($slurm_version), $N trivial jobs

$NODES node names on this host for both ($CPUS CPUs each), 4 shells submitting in parallel:
\`sbatch -Q -o /dev/null --wrap true\` vs \`echo true > jobs/new\`. Completion is from the first
submission until no job is left queued or running (Slurm: \`squeue\`; clusterfs: \`jobs/queue\`),
capped at ${WAIT_S} s.

| | submit $N (s) | submissions/s | all ended (s) | completed | completed/s |
|---|---|---|---|---|---|
| Slurm | $slurm_submit | $(rate "$N" "$slurm_submit") | $slurm_all | $slurm_done | $(rate "$slurm_done" "$slurm_all") |
| clusterfs | $ours_submit | $(rate "$N" "$ours_submit") | $ours_all | $ours_done | $(rate "$ours_done" "$ours_all") |
| **ratio** clusterfs / Slurm | | **$(awk -v a="$slurm_submit" -v b="$ours_submit" 'BEGIN { printf "%.2fx", a / b }')** | | | **$(awk -v a="$ours_done" -v b="$ours_all" -v c="$slurm_done" -v d="$slurm_all" 'BEGIN { printf "%.2fx", (a / b) / (c / d) }')** |

clusterfs jobs not ending \`done 0\`: $ours_failed.
EOF
