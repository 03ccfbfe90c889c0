#!/usr/bin/env bash
# Times `mkdir vms/<name>` to a defined, started VM (the head has it "running on <node>": its
# qcow2 overlay made and its qemu started, TCG) for a 1 GiB and a 20 GiB template, beside a
# full copy of the template disk plus the same qemu start (what virt-clone does by default:
# copy the disk). Template disks are raw files with every block allocated. Prints a Markdown
# table; the goal is under 0.5 s, whatever the template size.
#   BENCH_ROUNDS=3 benches/vms.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${BENCH_ROUNDS:-3}
source benches/lib.sh
bench_work clusterfs-bench-vms
bench_cleanup() { pkill -9 -f "qemu-system.*$work" 2>/dev/null; }

mkdir -p "$work/mnt" "$work/tpl" "$work/copies"
printf '[vms]\naccel = "tcg"\nshutdown_timeout_s = 1\n' > "$work/config.toml"
target/release/clusterfs up "$work/mnt" --nodes bench0 --state "$work/state" --listen 127.0.0.1:0 \
  --config "$work/config.toml" > /dev/null 2> "$work/head.log" &
head=$!
wait_up "$work/mnt" bench0

echo
echo "### VMs: mkdir to a started VM (\`BENCH_ROUNDS=$ROUNDS benches/vms.sh\`)"
echo
echo "| template | clusterfs mkdir -> running (s, best of $ROUNDS) | full copy + qemu start (s) | ratio |"
echo "|---|---|---|---|"
for size in 1 20; do
  tpl="$work/tpl/t${size}g.raw"
  fallocate -l "${size}G" "$tpl"
  printf '{"disk":"%s","format":"raw","mem":"128M"}\n' "$tpl" > "$work/mnt/vms/templates/t${size}g"
  ours=()
  for r in $(seq 1 "$ROUNDS"); do
    name="b${size}r$r"
    printf '{"name":"%s","template":"t%sg"}\n' "$name" "$size" > "$work/req"
    t0=$(now)
    cat "$work/req" > "$work/mnt/vms/new"
    until grep -q '^running on' "$work/mnt/vms/$name/state" 2>/dev/null; do sleep 0.01; done
    ours+=("$(elapsed "$t0")")
    rmdir "$work/mnt/vms/$name"
  done
  t0=$(now)
  cp --sparse=never "$tpl" "$work/copies/c.raw"
  qemu-system-x86_64 -name "guest=copy,debug-threads=on" -accel tcg -m 128M -display none -nodefaults \
    -drive "file=$work/copies/c.raw,if=virtio,format=raw" -pidfile "$work/copies/pid" -daemonize
  copy=$(elapsed "$t0")
  kill "$(cat "$work/copies/pid")"
  rm -f "$work/copies/c.raw" "$tpl"
  best=$(min "${ours[@]}")
  echo "| ${size} GiB | $best | $copy | $(awk -v a="$best" -v b="$copy" 'BEGIN { printf "%.1fx faster", b / a }') |"
done
