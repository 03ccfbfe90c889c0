# Sourced by the benchmark scripts: a work directory that goes on exit with everything under
# it (the head, mounts, loop devices), a wait for node names to report, and timing helpers.

now() { date +%s.%N; }
# elapsed T0: seconds since T0 (a `now`), to the millisecond.
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
# min X...: the smallest number given.
min() { printf '%s\n' "$@" | sort -g | head -1; }

# bench_work NAME [BASE]: makes $work (mode 755, under BASE, default /tmp) and removes it on
# exit, after the script's own `bench_cleanup` if it defines one, then the head started as
# $head, then every mount and loop device under $work.
bench_work() {
  work=$(mktemp -d "${2:-/tmp}/$1.XXXXXX")
  chmod 755 "$work"
  trap bench_exit EXIT
}

bench_exit() {
  set +e
  if declare -F bench_cleanup > /dev/null; then bench_cleanup; fi
  [ -n "${head:-}" ] && kill "$head" 2> /dev/null && wait "$head" 2> /dev/null
  unmount_under "$work"
  for d in $(losetup -l -n -O NAME,BACK-FILE | awk -v w="$work" 'index($2, w) == 1 {print $1}'); do
    losetup -d "$d"
  done
  rm -rf "$work"
}

# unmount_under DIR: lazily unmounts every mount under DIR, deepest first, until none is left
# (a FUSE mount may stay busy for a moment after its head ends).
unmount_under() {
  local mounts
  for _ in 1 2 3 4 5; do
    mounts=$(awk -v d="$1/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    [ -z "$mounts" ] && return 0
    for m in $mounts; do umount -l "$m" 2> /dev/null; done
    sleep 0.2
  done
}

# wait_up MNT NODES [SET]: waits up to 60 s until MNT's nodes/SET (default `up`) reads NODES
# (a folded set).
wait_up() {
  local set=${3:-up}
  for _ in $(seq 1 600); do
    [ "$(cat "$1/nodes/$set" 2> /dev/null)" = "$2" ] && return 0
    sleep 0.1
  done
  echo "bench: nodes/$set of $1 never read $2 (it reads: $(cat "$1/nodes/$set" 2> /dev/null))" >&2
  return 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# bench_etcd PREFIX: starts a 3-member etcd cluster on loopback ports, data under $work; sets
# $store to its URL with /PREFIX and adds the members to $pids, which the script's
# `bench_cleanup` stops (after the heads that use them).
bench_etcd() {
  local clients=() peers=() initial=() i
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
  store="etcd://127.0.0.1:${clients[0]},127.0.0.1:${clients[1]},127.0.0.1:${clients[2]}/$1"
}
