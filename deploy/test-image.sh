#!/usr/bin/env bash
# Builds the runtime image's root filesystem from Debian packages (no container registry is needed:
# mmdebstrap, the package list of deploy/image-packages.txt and deploy/image-setup.sh, as the
# Dockerfile's `full` target), puts the given binaries in, imports it into podman and runs it:
#   1. `shmback --version`, `shmback demo` (read-only root filesystem, as in Kubernetes)
#   2. the pod topology: the uploader and the app in two containers that share only a tmpfs at
#      /dev/shm (separate PID namespaces, no network, uids 10001 and 10002 in group 10001, the
#      uploader's --group-shared segment), one batch through the ring, the repository then
#      restored by restic and compared with the source.
#   3. deploy/akash/deploy.shm.yaml's one container, its `command` and `args` as the SDL has them
#      (only the app script swapped for a test script around the SDL's own `shmback-send` line):
#      `shmback run --segment /dev/shm/shmback --restore-if-empty /data -- /bin/sh -c …`. Lease 1
#      sends /data and exits 0 (shmback exits 0); lease 2 is a NEW container with an empty /data
#      (only a root-owned lost+found, as on a fresh ext4 volume) whose app starts after the restore
#      and checks the checksums lease 1 wrote; the restored tree is compared with lease 1's. An
#      app's exit status 3 is shmback's.
#   4. deploy/akash/deploy.s3.yaml's two services, nothing shared but a podman network (with
#      name resolution: the app reaches http://backup:8700 by the alias `backup`): the backup
#      container runs the SDL's `shmback run --listen 0.0.0.0:8700` with the token and the
#      repository; the app container (uid 10002, no repository credentials, its own /dev/shm) runs
#      the SDL's `shmback-send` line with the SDL's SHMBACK_TO and SHMBACK_PRODUCER; a wrong token
#      exits 7 and stores nothing; restic restores the repository and it is compared with /data.
#
# Usage: deploy/test-image.sh [BIN_DIR]   (default target/debug; CI passes the test build's binaries,
# debug info stripped on the way in — a dist build would add ~15 minutes to CI for the same code).
# Needs root (mmdebstrap --mode=root, rootful podman); installs mmdebstrap, podman, runc, restic.
#
# Podman here: crun and runc both refused podman's default rlimits (`setrlimit RLIMIT_NPROC` /
# `RLIMIT_NOFILE: Operation not permitted`: the sandbox lacks CAP_SYS_RESOURCE and podman asks for
# more than the hard limit), and crun refuses hybrid cgroups. So every container runs with
# `--runtime runc` and explicit `--ulimit nofile=4096:4096 --ulimit nproc=4096:4096`, below the
# hard limits; on an ordinary host the same commands work unchanged. Networks work as on a host
# (netavark, aardvark-dns for names).
# Reads the SDLs with python3's yaml (PyYAML; installed with pip if missing).
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
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml

work=$(mktemp -d)
shm_dir=$work/shm
cleanup() {
  podman rm -f shmback-ci-up-$$ shmback-ci-app-$$ shmback-ci-backup-$$ >/dev/null 2>&1 || true
  podman network rm -f shmback-ci-$$ >/dev/null 2>&1 || true
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

container=(podman --runtime runc run --rm --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
run=("${container[@]}" --network none)

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
grep -q ' uid 10002 gid 10001 ' <<< "$app_out"
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

# sdl FILE SERVICE argv|send|env: the service's command+args, the `shmback-send` command of its
# app script (up to `||`), or its env entries; NUL-separated, for mapfile -d ''.
sdl() {
  python3 - "$@" <<'EOF'
import sys, yaml
path, name, what = sys.argv[1:]
svc = yaml.safe_load(open(path))["services"][name]
if what == "argv":
    out = svc.get("command", []) + svc.get("args", [])
elif what == "send":
    sends = [l.strip() for l in svc["args"][-1].splitlines() if l.strip().startswith("shmback-send ")]
    assert len(sends) == 1, f"{path}: {name}'s script should run shmback-send once: {sends}"
    out = [sends[0].split(" ||")[0]]
else:
    out = svc.get("env", [])
assert out, f"{path}: service {name} has no {what}"
sys.stdout.write("".join(x + "\0" for x in out))
EOF
}
# The SDL's variables minus the credentials and the token, which the test sets.
sdl_env() {
  local e
  mapfile -d '' e < <(sdl "$1" "$2" env)
  for v in "${e[@]}"; do
    case $v in RESTIC_*|AWS_*|SHMBACK_TOKEN=*) ;; *) printf -- '-e\0%s\0' "$v" ;; esac
  done
}

echo "--- deploy.shm.yaml: one container, shmback run supervising the app; a new lease restores /data"
section=$(date +%s)
mapfile -d '' shm_argv < <(sdl deploy/akash/deploy.shm.yaml app argv)
mapfile -d '' shm_send < <(sdl deploy/akash/deploy.shm.yaml app send)
mapfile -d '' shm_env < <(sdl_env deploy/akash/deploy.shm.yaml app)
test "${shm_argv[*]: -3:2}" = "/bin/sh -c" || { echo "deploy.shm.yaml: the app is no longer /bin/sh -c SCRIPT" >&2; exit 1; }
echo "entrypoint: ${shm_argv[*]:0:${#shm_argv[@]}-1} SCRIPT; the SDL's send: $shm_send"
mkdir -p "$work/lease1" "$work/lease2/lost+found"
cp -r "$work/data/." "$work/lease1/"
chown -R 10001:10001 "$work/lease1" "$work/lease2"; chown root:root "$work/lease2/lost+found"
chmod 0700 "$work/lease2/lost+found"
"${run[@]}" --read-only -v "$work/repo:/repo" -e RESTIC_REPOSITORY=/repo/lease -e RESTIC_PASSWORD "$image" init
# As on Akash: the image's user, /dev/shm the service's own ram volume, /data a persistent volume.
lease() {
  local dir=$1 script=$2
  "${run[@]}" --read-only --shm-size=64m -v "$work/$dir:/data" -v "$work/repo:/repo" "${shm_env[@]}" \
    -e RESTIC_REPOSITORY=/repo/lease -e RESTIC_PASSWORD --entrypoint "${shm_argv[0]}" "$image" \
    "${shm_argv[@]:1:${#shm_argv[@]}-2}" "$script"
}
code=0
lease lease1 "cd /data && find . -type f -exec sha256sum {} + > /tmp/sums && mv /tmp/sums SHA256SUMS && $shm_send" \
  > "$work/lease1.log" 2>&1 || code=$?
grep -v ' INFO ' "$work/lease1.log" || true
test $code = 0 || { cat "$work/lease1.log"; echo "lease 1: shmback exited $code, not the app's 0" >&2; exit 1; }
grep -q 'stored as snapshot [0-9a-f]\{64\}$' "$work/lease1.log"
code=0
lease lease2 'cd /data && sha256sum --check --quiet SHA256SUMS && echo "lease 2: the app found /data restored"' \
  > "$work/lease2.log" 2>&1 || code=$?
grep -e 'restored `data`' -e 'lease 2' "$work/lease2.log" || true
test $code = 0 || { cat "$work/lease2.log"; echo "lease 2: shmback exited $code (the app's checksum check)" >&2; exit 1; }
diff -r --no-dereference -x lost+found "$work/lease1" "$work/lease2"
echo "lease 2's /data is identical to lease 1's (owned by $(stat -c %u:%g "$work/lease2/SHA256SUMS"))"
code=0
lease lease2 'exit 3' > "$work/lease3.log" 2>&1 || code=$?
test $code = 3 || { cat "$work/lease3.log"; echo "the app exited 3, shmback $code" >&2; exit 1; }
echo "the app's exit status 3 is shmback's ($(( $(date +%s) - section )) s)"

echo "--- deploy.s3.yaml: the app and the backup service, only a network between them"
section=$(date +%s)
mapfile -d '' backup_argv < <(sdl deploy/akash/deploy.s3.yaml backup argv)
mapfile -d '' backup_env < <(sdl_env deploy/akash/deploy.s3.yaml backup)
mapfile -d '' app_send < <(sdl deploy/akash/deploy.s3.yaml app send)
mapfile -d '' app_env < <(sdl_env deploy/akash/deploy.s3.yaml app)
echo "backup: ${backup_argv[*]}; app: ${app_env[*]} $app_send"
podman network create shmback-ci-$$ >/dev/null
"${run[@]}" --read-only -v "$work/repo:/repo" -e RESTIC_REPOSITORY=/repo/http -e RESTIC_PASSWORD "$image" init
export SHMBACK_TOKEN="ci-token-$$"
podman --runtime runc run -d --name shmback-ci-backup-$$ --network shmback-ci-$$ --network-alias backup \
  --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --read-only -v "$work/repo:/repo" "${backup_env[@]}" \
  -e RESTIC_REPOSITORY=/repo/http -e RESTIC_PASSWORD -e SHMBACK_TOKEN --entrypoint "${backup_argv[0]}" \
  "$image" "${backup_argv[@]:1}" >/dev/null 2>"$work/backup-start.log" || { cat "$work/backup-start.log"; exit 1; }
# The app: its own uid and group, the data read-only, no repository credentials, no shared volume;
# shmback-send resends until the listener is up (for up to the SDL's --timeout: 120 s are enough
# here, so a backup service that never listens fails this test in 2 minutes, not 30).
app_opts=(--network shmback-ci-$$ --read-only --user 10002:10002 -v "$work/data:/data:ro" "${app_env[@]}")
code=0
app_out=$("${container[@]}" "${app_opts[@]}" -e SHMBACK_TOKEN --entrypoint /bin/sh "$image" -c "exec timeout 120 $app_send" 2>&1) || code=$?
echo "$app_out"
test $code = 0 || { podman logs shmback-ci-backup-$$; echo "the app's shmback-send exited $code" >&2; exit 1; }
snapshot=$(echo "$app_out" | sed -n 's/.*stored as snapshot \([0-9a-f]\{64\}\)$/\1/p')
test -n "$snapshot" || { echo "shmback-send --wait-durable printed no snapshot id" >&2; exit 1; }
code=0
"${container[@]}" "${app_opts[@]}" -e SHMBACK_TOKEN=not-the-token --entrypoint shmback-send "$image" \
  --to http://backup:8700 --wait-durable --timeout 30 /data > "$work/wrong-token.log" 2>&1 || code=$?
test $code = 7 || { cat "$work/wrong-token.log"; echo "a wrong token: shmback-send exited $code, not 7" >&2; exit 1; }
echo "a wrong token: shmback-send exited 7: $(tail -n 1 "$work/wrong-token.log")"
podman stop -t 30 shmback-ci-backup-$$ >/dev/null
code=$(podman wait shmback-ci-backup-$$ 2>/dev/null || podman inspect shmback-ci-backup-$$ --format '{{.State.ExitCode}}')
podman logs shmback-ci-backup-$$ > "$work/backup.log" 2>&1
grep -e 'listening' -e 'batch stored' "$work/backup.log" || true
grep -q "batch stored from=\"http:my-app\" .*snapshot=${snapshot:0:8}" "$work/backup.log"
test "$code" = 0 || { echo "the backup service exited $code on SIGTERM" >&2; exit 1; }
podman rm shmback-ci-backup-$$ >/dev/null
podman network rm shmback-ci-$$ >/dev/null
restic -r "$work/repo/http" check --read-data -q
restic -r "$work/repo/http" snapshots --json | python3 -c '
import json, sys
s = json.load(sys.stdin); assert [x["id"] for x in s] == [sys.argv[1]] and s[0]["tags"] == ["akash"], s
print("restic lists the one snapshot, tag akash (the wrong token stored nothing)")' "$snapshot"
restic -r "$work/repo/http" restore latest --target "$work/restored-http" -q
diff -r --no-dereference "$work/data" "$work/restored-http/data"
echo "restic's restore of the batch sent over HTTP is identical to the source ($(( $(date +%s) - section )) s)"
echo "test-image.sh: passed in $(( $(date +%s) - started )) s"
