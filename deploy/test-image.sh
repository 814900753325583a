#!/usr/bin/env bash
# Builds the runtime image's root filesystem from Debian packages (no container registry is needed:
# mmdebstrap, the package list of deploy/image-packages.txt and deploy/image-setup.sh, as the
# Dockerfile's `full` target), puts the given binaries in, imports it into podman and runs it:
#   1. `shmback --version`, `shmback demo` (read-only root filesystem, as in Kubernetes)
#   2. the pod topology: the uploader and the app in two containers that share only a tmpfs at
#      /dev/shm (separate PID namespaces, no network, uids 10001 and 10002 in group 10001, the
#      uploader's --group-shared segment), one batch through the ring, the repository then
#      restored by restic and compared with the source.
#
# Usage: deploy/test-image.sh [BIN_DIR]   (default target/debug; CI passes the test build's binaries,
# debug info stripped on the way in — a dist build would add ~15 minutes to CI for the same code).
# Needs root (mmdebstrap --mode=root, rootful podman); installs mmdebstrap, podman, runc, restic.
#
# Podman here: crun and runc both refused podman's default rlimits (`setrlimit RLIMIT_NPROC` /
# `RLIMIT_NOFILE: Operation not permitted`: the sandbox lacks CAP_SYS_RESOURCE and podman asks for
# more than the hard limit), and crun refuses hybrid cgroups. So every container runs with
# `--runtime runc` and explicit `--ulimit nofile=4096:4096 --ulimit nproc=4096:4096`, below the
# hard limits; on an ordinary host the same commands work unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bin=${1:-target/debug}
suite=bookworm
image=localhost/shmback-ci:$$
for b in shmback shmback-send; do
  test -x "$bin/$b" || { echo "$bin/$b is missing: build it first (cargo build --bin $b)" >&2; exit 1; }
done
if [ "$(id -u)" != 0 ]; then
  echo "test-image.sh needs root (mmdebstrap --mode=root and rootful podman)" >&2; exit 1
fi
missing=()
for tool in mmdebstrap podman runc restic; do command -v $tool >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap podman runc restic >/dev/null
fi

work=$(mktemp -d)
shm_dir=$work/shm
cleanup() {
  podman rm -f shmback-ci-up-$$ shmback-ci-app-$$ >/dev/null 2>&1 || true
  umount "$shm_dir" 2>/dev/null || true
  podman rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "--- root filesystem: debian $suite (variant essential) + $(grep -v '^#' deploy/image-packages.txt | paste -sd' ')"
mkdir -p "$work/bin"
for b in shmback shmback-send; do strip --strip-debug -o "$work/bin/$b" "$bin/$b"; done
packages=$(grep -v '^#' deploy/image-packages.txt | paste -sd,)
# Documentation is dropped as debian:*-slim drops it (copyright files stay).
mmdebstrap --quiet --mode=root --variant=essential --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='chroot "$1" sh -s < deploy/image-setup.sh' \
  --customize-hook="install -m 0755 -t \"\$1/usr/local/bin\" $work/bin/shmback $work/bin/shmback-send" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$suite" "$work/rootfs.tar" \
  "deb http://deb.debian.org/debian $suite main" \
  "deb http://deb.debian.org/debian-security $suite-security main"
podman import --quiet \
  --change 'USER=10001:10001' --change 'ENV=HOME=/var/lib/shmback' --change 'WORKDIR=/var/lib/shmback' \
  --change 'ENTRYPOINT=["/usr/local/bin/shmback"]' --change 'CMD=["run"]' \
  "$work/rootfs.tar" "$image" >/dev/null
rm "$work/rootfs.tar"
size=$(podman image inspect "$image" --format '{{.Size}}')
echo "image $image: $((size / 1024 / 1024)) MiB (binaries: $(du -cm "$work"/bin/* | tail -1 | cut -f1) MiB, debug info stripped)"

run=(podman --runtime runc run --rm --network none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

echo "--- shmback --version, shmback-send --version (as uid 10001, read-only root filesystem)"
version=$("${run[@]}" --read-only "$image" --version)
echo "$version"; [[ $version == "shmback "* ]]
"${run[@]}" --read-only --entrypoint /usr/local/bin/shmback-send "$image" --version
test "$("${run[@]}" --entrypoint /usr/bin/id "$image" -u)" = 10001

echo "--- shmback demo in the image (read-only root, /tmp and /dev/shm tmpfs)"
"${run[@]}" --read-only --tmpfs /tmp:rw,mode=1777,size=256m --shm-size=64m "$image" demo /usr/share/common-licenses \
  > "$work/demo.log" 2>&1 || { cat "$work/demo.log"; exit 1; }
grep -v -e ' WARN ' -e ' INFO ' "$work/demo.log" | tail -n 12

echo "--- the pod topology: uploader and app share only a tmpfs at /dev/shm"
# A memory-backed volume as Kubernetes' emptyDir {medium: Memory} and Akash's `class: ram` make it.
mkdir -p "$shm_dir" && mount -t tmpfs -o size=64m,mode=1777,nosuid,nodev shmback-ci "$shm_dir"
mkdir -p "$work/repo" "$work/data/sub"
chown 10001:10001 "$work/repo"; chmod 0700 "$work/repo"
cp -r /usr/share/common-licenses "$work/data/sub/licenses"
head -c 3000000 /dev/urandom > "$work/data/random.bin"
printf 'x%.0s' $(seq 1000) > "$work/data/sub/x.txt"
ln -s sub/x.txt "$work/data/link"
chmod -R a+rX "$work/data"
export RESTIC_PASSWORD="ci-image-$$"
repo_env=(-e RESTIC_REPOSITORY=/repo/r -e RESTIC_PASSWORD)
"${run[@]}" --read-only -v "$work/repo:/repo" "${repo_env[@]}" "$image" init
podman --runtime runc run -d --name shmback-ci-up-$$ --network none --ulimit nofile=4096:4096 \
  --ulimit nproc=4096:4096 --read-only --user 10001:10001 -v "$shm_dir:/dev/shm" -v "$work/repo:/repo" \
  "${repo_env[@]}" "$image" run --segment /dev/shm/shmback --group-shared >/dev/null
for _ in $(seq 200); do
  podman exec shmback-ci-up-$$ test -f /dev/shm/shmback 2>/dev/null && break; sleep 0.1
done
podman exec shmback-ci-up-$$ test -f /dev/shm/shmback || { podman logs shmback-ci-up-$$; exit 1; }
seg=$(podman exec shmback-ci-up-$$ stat -c '%a %u %g' /dev/shm/shmback)
echo "segment /dev/shm/shmback: mode uid gid = $seg"; test "$seg" = "660 10001 10001"
up_ns=$(podman exec shmback-ci-up-$$ readlink /proc/1/ns/pid)
up_pid1=$(podman exec shmback-ci-up-$$ cat /proc/1/comm)
# The app: another uid in the uploader's group, its own PID namespace, the data read-only.
app_out=$(podman --runtime runc run --rm --name shmback-ci-app-$$ --network none --ulimit nofile=4096:4096 \
  --ulimit nproc=4096:4096 --read-only --user 10002:10001 -v "$shm_dir:/dev/shm" -v "$work/data:/data:ro" \
  --entrypoint /bin/sh "$image" -c \
  'echo "ns $(readlink /proc/1/ns/pid) uid $(id -u) gid $(id -g) procs $(ls /proc | grep -c "^[0-9]")";
   exec shmback-send --segment /dev/shm/shmback --wait-durable --timeout 120 --tag ci-image /data')
echo "$app_out"
app_ns=$(echo "$app_out" | sed -n 's/^ns \([^ ]*\) .*/\1/p')
echo "uploader: PID 1 is $up_pid1 in $up_ns; app: $app_ns"
test "$up_pid1" = shmback
test -n "$app_ns" && test "$app_ns" != "$up_ns" && test "$app_ns" != "$(readlink /proc/self/ns/pid)"
echo "$app_out" | grep -q ' uid 10002 gid 10001 '
snapshot=$(echo "$app_out" | sed -n 's/.*stored as snapshot \([0-9a-f]\{64\}\)$/\1/p')
test -n "$snapshot" || { echo "shmback-send --wait-durable printed no snapshot id" >&2; exit 1; }
podman stop -t 30 shmback-ci-up-$$ >/dev/null
code=$(podman wait shmback-ci-up-$$ 2>/dev/null || podman inspect shmback-ci-up-$$ --format '{{.State.ExitCode}}')
podman logs shmback-ci-up-$$ 2>&1 | tail -n 3
test "$code" = 0 || { echo "the uploader exited $code on SIGTERM" >&2; exit 1; }
podman rm shmback-ci-up-$$ >/dev/null

echo "--- restic restores what the container stored (snapshot $snapshot)"
restic -r "$work/repo/r" check --read-data -q
restic -r "$work/repo/r" snapshots --json | python3 -c '
import json, sys
s = json.load(sys.stdin); assert [x["id"] for x in s] == [sys.argv[1]] and s[0]["tags"] == ["ci-image"], s
print("restic lists the one snapshot, tag ci-image")' "$snapshot"
restic -r "$work/repo/r" restore latest --target "$work/restored" -q
diff -r --no-dereference "$work/data" "$work/restored/data"
echo "restic's restore of the app's batch is identical to the source"
echo "test-image.sh: passed in $(( $(date +%s) - started )) s"
