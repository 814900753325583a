#!/usr/bin/env bash
# restic reads what `shmback copy` wrote: a source repository gets two batches through the ring
# (a tree + a stream), `shmback copy --init-target` copies them to a second repository with
# another password, then restic checks the target (--read-data), lists the copies with their
# `original` ids, restores the latest and the result is compared with the source. A second
# `shmback copy` copies nothing; restic's own `copy` from the source finds nothing to copy either
# (it matches the originals shmback recorded).
# Needs restic (0.14 or newer). Usage: tests/copy/run.sh <dir with shmback and shmback-send>
set -euo pipefail
command -v restic >/dev/null || { echo "tests/copy/run.sh: restic is not installed (apt-get install restic)" >&2; exit 1; }
bin=$(cd "$1" && pwd)
for b in shmback shmback-send; do
  [ -x "$bin/$b" ] || { echo "tests/copy/run.sh: $bin/$b is missing (cargo build first)" >&2; exit 1; }
done
work=$(mktemp -d)
seg=/dev/shm/shmback-copy-ci-$$
up=
cleanup() { [ -n "$up" ] && kill "$up" 2>/dev/null; rm -f "$seg"; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/src"
cp -a /usr/share/doc/. "$work/src/doc" 2>/dev/null || true
find "$work/src/doc" -mindepth 1 -maxdepth 1 | sort | tail -n +100 | xargs rm -rf
head -c 4000000 /dev/urandom > "$work/src/random.bin"
head -c 2000000 /dev/urandom > "$work/stream.bin"

export RESTIC_REPOSITORY="$work/source" RESTIC_PASSWORD=copy-source
"$bin/shmback" init
"$bin/shmback" run --segment "$seg" 2> "$work/run.log" & up=$!
for _ in 1 2; do
  timeout 300 "$bin/shmback-send" --segment "$seg" --wait-durable --timeout 240 --stdin dump/stream.bin "$work/src" < "$work/stream.bin"
done
kill -TERM "$up"; wait "$up" || { cat "$work/run.log"; exit 1; }
up=

export SHMBACK_TO_PASSWORD=copy-target
timeout 600 "$bin/shmback" copy --to "$work/target" --init-target | tee "$work/copy1.txt"
grep -q ", 2 copied" "$work/copy1.txt"
timeout 600 "$bin/shmback" copy --to "$work/target" | tee "$work/copy2.txt"
grep -q "2 snapshots selected, 2 already in .*, 0 copied" "$work/copy2.txt"

export RESTIC_REPOSITORY="$work/target" RESTIC_PASSWORD=copy-target
restic check --read-data
src_ids=$(RESTIC_REPOSITORY="$work/source" RESTIC_PASSWORD=copy-source restic snapshots --json \
  | python3 -c 'import json,sys; print(" ".join(sorted(s["id"] for s in json.load(sys.stdin))))')
originals=$(restic snapshots --json | python3 -c 'import json,sys; print(" ".join(sorted(s["original"] for s in json.load(sys.stdin))))')
[ "$src_ids" = "$originals" ] || { echo "the copies name $originals as originals, the source has $src_ids" >&2; exit 1; }
echo "restic lists 2 copies, each naming its original"
restic restore latest --target "$work/restored"
diff -r --no-dereference "$work/src" "$work/restored$work/src"
cmp "$work/stream.bin" "$work/restored/dump/stream.bin"
echo "restic restores the copy identical to the source"

# restic's copy recognises shmback's copies: nothing new in the target.
before=$(find "$work/target/snapshots" -type f | wc -l)
RESTIC_FROM_PASSWORD=copy-source restic copy --from-repo "$work/source"
after=$(find "$work/target/snapshots" -type f | wc -l)
[ "$before" = "$after" ] || { echo "restic copied again what shmback copied ($before -> $after snapshots)" >&2; exit 1; }
echo "restic copy finds nothing left to copy"
echo "copy suite: every check passed"
