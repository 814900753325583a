#!/usr/bin/env bash
# restic's repository locks against shmback's, with restic itself (docs/locks.md):
#   1. while a batch is in flight through `shmback run`, restic sees its lock (`restic list
#      locks`) and `restic prune` refuses ("repository is already locked");
#   2. once the batch is stored the lock is gone, and `restic prune` runs;
#   3. `shmback forget --prune` waits for a `restic backup --stdin` whose stdin is held open, and
#      succeeds once it ends;
#   4. a lock left by a SIGKILLed `shmback run` (a dead process on this host) is stale for restic:
#      `restic unlock` removes it;
#   5. `restic check` passes at the end.
# Needs restic (any 0.14+). Installs nothing; every wait is bounded; exits non-zero on failure.
# Usage: tests/locks/run.sh <dir with shmback and shmback-send>
set -euo pipefail
command -v restic >/dev/null || { echo "restic is not installed: this suite needs it (apt-get install restic)" >&2; exit 1; }
bin=$(cd "$1" && pwd)
for b in shmback shmback-send; do test -x "$bin/$b" || { echo "$bin/$b is missing" >&2; exit 1; }; done
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -f /dev/shm/shmback-locks-$$-*
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for f in "$work"/*.log; do echo "--- $f" >&2; cat "$f" >&2; done; exit 1; }
# until <seconds> <command...>: retries the command every 0.1 s until it succeeds.
until_ok() {
  local limit=$1; shift
  for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
nlocks() { restic --no-lock list locks 2>/dev/null | grep -c . || true; }
has_locks() { test "$(nlocks)" -ge "$1"; }
log_says() { grep -q "$2" "$1"; }

export RESTIC_REPOSITORY="$work/repo" RESTIC_PASSWORD=locks-ci
restic version
"$bin/shmback" init
seg=/dev/shm/shmback-locks-$$-a

echo "--- 1. a batch in flight: restic sees the lock, restic prune refuses"
"$bin/shmback" run --segment "$seg" 2> "$work/run.log" & up=$!; pids+=($up)
until_ok 30 test -e "$seg" || fail "the daemon did not create its segment"
mkfifo "$work/stdin"
# The producer streams a file of unknown size from a pipe kept open: the batch stays in flight.
"$bin/shmback-send" --segment "$seg" --wait-durable --timeout 120 --stdin dump/held.bin < "$work/stdin" \
  > "$work/send.log" 2>&1 & send=$!; pids+=($send)
exec 3> "$work/stdin"
head -c 100000 /dev/urandom >&3
until_ok 60 has_locks 1 || fail "restic lists no lock while a batch is in flight"
restic --no-lock list locks
restic --no-lock cat lock "$(restic --no-lock list locks | head -n1)" | tee "$work/lock.json"
python3 -c 'import json,sys; l=json.load(open(sys.argv[1])); assert l["exclusive"] is False and l["pid"] == int(sys.argv[2]) and l["hostname"], l' \
  "$work/lock.json" "$up" || fail "restic does not read the batch's lock as a non-exclusive lock of pid $up"
if timeout 120 restic prune > "$work/prune1.log" 2>&1 3>&-; then fail "restic prune ran while a batch was in flight"; fi
grep -q "repository is already locked" "$work/prune1.log" || fail "restic prune failed for another reason"
echo "restic prune refused: $(grep -m1 'already locked' "$work/prune1.log")"

echo "--- 2. the batch is stored, its lock removed; restic prune runs"
head -c 100000 /dev/urandom >&3
exec 3>&-
timeout 120 tail --pid=$send -f /dev/null || fail "the producer did not finish"
wait $send || fail "the batch was not stored"
test "$(nlocks)" = 0 || fail "a lock was left after the batch"
timeout 300 restic prune > "$work/prune2.log" 2>&1 || fail "restic prune failed with no batch in flight"
echo "restic prune ran between batches"

echo "--- 3. shmback forget --prune waits for restic backup --stdin, then succeeds"
"$bin/shmback-send" --segment "$seg" --wait-durable --timeout 120 --stdin dump/second.bin < /dev/null
mkfifo "$work/restic-stdin"
restic backup --stdin --stdin-filename from-restic.bin < "$work/restic-stdin" > "$work/restic-backup.log" 2>&1 & rb=$!; pids+=($rb)
exec 4> "$work/restic-stdin"
echo "restic's data" >&4
until_ok 60 has_locks 1 || fail "restic backup took no lock"
# (4>&-: it must not keep restic's stdin open itself.)
"$bin/shmback" forget --keep-last 1 --prune --retry-lock 5m > "$work/forget.log" 2>&1 4>&- & fg=$!; pids+=($fg)
until_ok 60 log_says "$work/forget.log" "repository already locked, waiting up to 5m0s" \
  || fail "shmback forget --prune did not wait for restic's lock"
kill -0 $fg 2>/dev/null || fail "shmback forget ended while restic held its lock"
exec 4>&-
wait $rb || fail "restic backup failed"
timeout 300 tail --pid=$fg -f /dev/null || fail "shmback forget --prune did not finish"
wait $fg || fail "shmback forget --prune failed once restic's lock was gone"
grep -q "pruned" "$work/forget.log" || fail "shmback forget did not prune"
echo "shmback forget --prune waited for restic backup and then pruned"

echo "--- 4. a SIGKILLed daemon's lock is stale for restic unlock"
kill -TERM $up; wait $up || fail "the daemon did not stop cleanly"
rm -f "$seg"
"$bin/shmback" run --segment "$seg" 2> "$work/run2.log" & up=$!; pids+=($up)
until_ok 30 test -e "$seg" || fail "the second daemon did not create its segment"
mkfifo "$work/stdin2"
"$bin/shmback-send" --segment "$seg" --timeout 120 --stdin dump/killed.bin < "$work/stdin2" > "$work/send2.log" 2>&1 & send=$!; pids+=($send)
exec 5> "$work/stdin2"
head -c 100000 /dev/urandom >&5
until_ok 60 has_locks 1 || fail "no lock while the second batch is in flight"
kill -9 $up; wait $up 2>/dev/null || true
exec 5>&-
wait $send 2>/dev/null || true
test "$(nlocks)" = 1 || fail "the killed daemon's lock is not left behind"
restic unlock 2>&1 | tee "$work/unlock.log"
test "$(nlocks)" = 0 || fail "restic unlock did not remove the dead daemon's lock"
echo "restic unlock removed the lock of the killed daemon"

echo "--- 5. restic check"
restic check
echo "restic and shmback honour each other's locks"
