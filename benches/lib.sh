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
