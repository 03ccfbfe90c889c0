#!/usr/bin/env bash
# Times `mkdir images/<user>` to a mounted, writable workspace (mount, then a file written in
# it), with a spare image waiting and cold (spares = 0: truncate + mkfs), for 10 GiB and
# 500 GiB images; and, side by side, the plain shell way lococlu took (truncate, mkfs.ext4,
# mount -o loop). Spares are made at the default size (10 GiB here), so a 500 GiB image is
# always formatted anew. Prints a Markdown table; ratios are to the plain shell way.
#   BENCH_ROUNDS=3 benches/images.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${BENCH_ROUNDS:-3}
source benches/lib.sh
bench_work clusterfs-bench-images
for n in $(seq 0 $((ROUNDS * 4 - 1))); do
  id "cfbench$n" > /dev/null 2>&1 || useradd -M "cfbench$n"
done

# start SPARES: a head with one local node and one 100 TiB volume, default size 10 GiB.
start() {
  [ -n "${head:-}" ] && kill "$head" && wait "$head" 2>/dev/null || true
  unmount_under "$work/mnt"
  rm -rf "$work/state" "$work/vol" && mkdir -p "$work/mnt" "$work/vol" "$work/home"
  printf '[images]\ndefault_size = "10G"\nspares = %s\nmount_root = "%s"\nhealth_interval_s = 1\n[images.volumes.vol]\npath = "%s"\ncapacity = "100T"\n' \
    "$1" "$work/home" "$work/vol" > "$work/config.toml"
  target/release/clusterfs up "$work/mnt" --nodes bench0 --state "$work/state" --listen 127.0.0.1:0 \
    --config "$work/config.toml" > /dev/null 2> "$work/head.log" &
  head=$!
  wait_up "$work/mnt" bench0
}
user=0
# ours SIZE USER: mkdir (or images/new for another size), mount, write a file as the user.
ours() {
  local u="$2" t0
  for _ in $(seq 1 300); do grep -q "^spares $SPARES\$" "$work/mnt/images/volumes/vol" && break; sleep 0.1; done
  t0=$(now)
  if [ "$1" = 10G ]; then mkdir "$work/mnt/images/$u"; else echo "user=$u size=$1" > "$work/mnt/images/new"; fi
  echo mount > "$work/mnt/images/$u/ctl"
  runuser -u "$u" -- sh -c "echo hello > $work/home/$u/hello"
  elapsed "$t0"
  grep -q "from a spare" "$work/mnt/images/$u/state" && [ "$SPARES" = 0 ] && { echo "a spare was used cold" >&2; exit 1; }
  echo umount > "$work/mnt/images/$u/ctl"
}
# shell SIZE: the plain way, as root.
shell() {
  local t0 f="$work/vol/shell.img"
  rm -f "$f"
  t0=$(now)
  truncate -s "$1" "$f" && mkfs.ext4 -F -q "$f" && mkdir -p "$work/home/shell" && mount -o loop "$f" "$work/home/shell"
  echo hello > "$work/home/shell/hello"
  elapsed "$t0"
  umount "$work/home/shell"
}
mkdir -p "$work/vol" "$work/home"
declare -A r
for size in 10G 500G; do
  s=(); for _ in $(seq 1 "$ROUNDS"); do s+=("$(shell "$size")"); done; r[shell,$size]=$(min "${s[@]}")
done
for SPARES in 1 0; do
  start "$SPARES"
  for size in 10G 500G; do
    s=()
    for _ in $(seq 1 "$ROUNDS"); do
      s+=("$(ours "$size" "cfbench$user")")
      user=$((user + 1))
    done
    r[$SPARES,$size]=$(min "${s[@]}")
  done
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
cat <<EOF
### mkdir to a mounted, writable image (best of $ROUNDS; \`BENCH_ROUNDS=$ROUNDS benches/images.sh\`)

| size | clusterfs, spare ready | clusterfs, cold | shell: truncate + mkfs.ext4 + mount -o loop |
|---|---|---|---|
| 10 GiB | ${r[1,10G]} s ($(ratio "${r[1,10G]}" "${r[shell,10G]}")) | ${r[0,10G]} s ($(ratio "${r[0,10G]}" "${r[shell,10G]}")) | ${r[shell,10G]} s |
| 500 GiB | ${r[1,500G]} s ($(ratio "${r[1,500G]}" "${r[shell,500G]}")) | ${r[0,500G]} s ($(ratio "${r[0,500G]}" "${r[shell,500G]}")) | ${r[shell,500G]} s |
EOF
