#!/usr/bin/env bash
# A real Prometheus scraping `shmback run --metrics-addr` every second while a backup goes
# through a segment: the expected series reach Prometheus with the expected values (asked through
# its HTTP query API), and deploy/prometheus/shmback-rules.yml passes `promtool check rules`, its
# unit tests (tests/metrics/rules.test.yml), and loads and evaluates in the running server.
# Needs prometheus and promtool (Debian's `prometheus` package), curl, jq, python3; installs
# nothing. Every wait is bounded; the daemons started here are stopped on exit.
# Usage: tests/metrics/run.sh <dir with shmback and shmback-send>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=$(cd "${1:?usage: tests/metrics/run.sh <dir with shmback and shmback-send>}" && pwd)
for tool in prometheus promtool curl jq python3; do
  command -v "$tool" >/dev/null || {
    echo "tests/metrics/run.sh needs $tool (prometheus and promtool: apt-get install prometheus)" >&2
    exit 1
  }
done
for b in shmback shmback-send; do
  test -x "$bin/$b" || { echo "$bin/$b is missing: build it first (cargo build)" >&2; exit 1; }
done
rules="$root/deploy/prometheus/shmback-rules.yml"

work=$(mktemp -d)
seg=/dev/shm/shmback-metrics-$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work" "$seg"
}
trap cleanup EXIT
fail() {
  echo "FAILED: $*" >&2
  for log in "$work"/*.log; do echo "--- $log" >&2; tail -n 30 "$log" >&2; done
  exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== promtool: the rules are valid and their unit tests pass"
promtool check rules "$rules"
promtool test rules "$here/rules.test.yml"

echo "== shmback run --metrics-addr, scraped by Prometheus every second"
export RESTIC_REPOSITORY="$work/repo" RESTIC_PASSWORD=metrics-ci
"$bin/shmback" init
metrics_port=$(free_port)
prom_port=$(free_port)
"$bin/shmback" run --segment "$seg" --metrics-addr "127.0.0.1:$metrics_port" > "$work/shmback.out" 2> "$work/shmback.log" &
pids+=($!)
cat > "$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $rules
scrape_configs:
  - job_name: shmback
    static_configs:
      - targets: ["127.0.0.1:$metrics_port"]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)
prom="http://127.0.0.1:$prom_port"

# until SECONDS WHAT COMMAND...: runs COMMAND every 0.2 s until it succeeds, at most SECONDS.
until_ok() {
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || fail "$what (waited ${limit} s)"
    sleep 0.2
  done
}
until_ok 60 "shmback's /readyz never answered 200" curl -fsS "http://127.0.0.1:$metrics_port/readyz"
until_ok 60 "Prometheus never became ready" curl -fsS "$prom/-/ready"

# query EXPR: the value of the one series EXPR selects, or nothing.
query() {
  curl -fsS --get "$prom/api/v1/query" --data-urlencode "query=$1" |
    jq -r 'if .data.result | length == 1 then .data.result[0].value[1] else empty end'
}
# expect EXPR VALUE: waits (bounded) until Prometheus has EXPR at VALUE.
expect() {
  local end=$((SECONDS + 60)) got=""
  while ((SECONDS < end)); do
    got=$(query "$1" || true)
    [[ "$got" == "$2" ]] && { echo "ok: $1 = $2"; return 0; }
    sleep 0.5
  done
  fail "$1: expected $2, Prometheus has '${got:-no series}'"
}

# holds EXPR: waits (bounded) until the PromQL comparison EXPR selects a series.
holds() {
  local end=$((SECONDS + 60))
  while ((SECONDS < end)); do
    [[ -n "$(query "$1" || true)" ]] && { echo "ok: $1"; return 0; }
    sleep 0.5
  done
  fail "$1 never held"
}

expect 'up{job="shmback"}' 1
expect "shmback_producer_alive{segment=\"$seg\"}" 0
expect 'shmback_snapshots' 0

echo "== a backup through the segment: 3 files, 300 000 bytes"
mkdir -p "$work/src/sub"
head -c 100000 /dev/urandom > "$work/src/a.bin"
head -c 150000 /dev/urandom > "$work/src/b.bin"
head -c 50000 /dev/urandom > "$work/src/sub/c.bin"
"$bin/shmback-send" --segment "$seg" --wait-durable --timeout 120 "$work/src" > "$work/send.log" 2>&1 ||
  fail "shmback-send failed"

expect "shmback_batches_total{source=\"$seg\",result=\"stored\"}" 1
expect "shmback_batches_total{source=\"$seg\",result=\"rejected\"}" 0
expect "shmback_batches_total{source=\"$seg\",result=\"failed\"}" 0
expect 'shmback_files_total{state="new"}' 3
expect 'shmback_files_total{state="unmodified"}' 0
expect 'shmback_processed_bytes_total' 300000
expect 'shmback_snapshots' 1
expect 'shmback_batch_duration_seconds_count' 1
expect "shmback_producer_alive{segment=\"$seg\"}" 0
# Random bytes do not compress: nearly all of them are added and stored.
holds 'shmback_added_bytes_total >= 300000'
holds 'shmback_stored_bytes_total > 250000'
holds "time() - shmback_last_success_timestamp_seconds{source=\"$seg\"} < 120"

echo "== the same tree again: every file unmodified"
"$bin/shmback-send" --segment "$seg" --wait-durable --timeout 120 "$work/src" >> "$work/send.log" 2>&1 ||
  fail "the second shmback-send failed"
expect "shmback_batches_total{source=\"$seg\",result=\"stored\"}" 2
expect 'shmback_files_total{state="unmodified"}' 3
expect 'shmback_files_total{state="new"}' 3
expect 'shmback_snapshots' 2

echo "== the alert rules are loaded and evaluated by the server"
rules_ok() {
  curl -fsS "$prom/api/v1/rules" | jq -e '
    [.data.groups[] | select(.name == "shmback") | .rules[]] as $r
    | ($r | length) == 5
      and all($r[]; .health == "ok" and .lastEvaluation != "0001-01-01T00:00:00Z")'
}
until_ok 30 "the rules did not all load and evaluate: $(curl -fsS "$prom/api/v1/rules" | jq -c '.data.groups')" rules_ok
echo "ok: 5 rules loaded and evaluated"
# shmback-send detached after each batch: ShmbackProducerGone is pending on the segment (it fires
# after 15 minutes), and nothing else is pending or firing.
alerts_ok() {
  curl -fsS "$prom/api/v1/alerts" | jq -e --arg seg "$seg" '
    [.data.alerts[] | select(.labels.alertname | startswith("Shmback"))]
    | length == 1 and .[0].labels.alertname == "ShmbackProducerGone" and .[0].labels.segment == $seg
      and .[0].state == "pending"'
}
until_ok 30 "expected only ShmbackProducerGone, pending: $(curl -fsS "$prom/api/v1/alerts")" alerts_ok
echo "ok: ShmbackProducerGone pending on $seg, nothing else pending or firing"

echo "== a producer attached and then gone shows in Prometheus"
# shmback-send --stdin stays attached while its input is open (6 s here).
"$bin/shmback-send" --segment "$seg" --wait-durable --timeout 120 --stdin dump/slow.bin \
  < <(head -c 1000 /dev/urandom; sleep 6) >> "$work/send.log" 2>&1 &
sender=$!
pids+=($sender)
expect "shmback_producer_alive{segment=\"$seg\"}" 1
wait "$sender" || fail "the slow shmback-send failed"
expect "shmback_producer_alive{segment=\"$seg\"}" 0
expect "shmback_batches_total{source=\"$seg\",result=\"stored\"}" 3

echo "== /healthz and /readyz"
[[ "$(curl -fsS "http://127.0.0.1:$metrics_port/healthz")" == ok ]] || fail "/healthz"
[[ "$(curl -fsS "http://127.0.0.1:$metrics_port/readyz")" == ready ]] || fail "/readyz"
echo "ok: /healthz and /readyz answer 200"
echo "tests/metrics/run.sh: all checks passed"
