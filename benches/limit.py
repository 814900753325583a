#!/usr/bin/env python3
"""Bandwidth limits, measured: how close `--limit-upload` and `--limit-download` hold their rate.

A local S3 server (`shmback-s3-server`: s3s + s3s-fs, its data on /dev/shm) holds the repository.
For each --upload limit: a fresh bucket, `shmback init`, `shmback run --limit-upload L`, then
`shmback-send --wait-durable` of a corpus of incompressible random files. The achieved upload rate
is the bytes the bucket grew by during the send over the send's wall time (from the send's start
to its durable ack). For each --download limit: `shmback restore latest --limit-download L` from
the last of those buckets; the rate is the bucket's bytes (everything a restore reads: packs,
index, snapshot, keys, config) over the command's wall time. Both rates include what is not
throttled (opening the repository, chunking and encryption before the first pack, writing the
restored files), so they can only fall short of the limit, never exceed it by that.

Each figure is reported as a ratio of the limit (the target: 0.9-1.0). Times are medians over
--runs.

  cargo build -p shmback-uploader -p shmback-writer -p shmback-benches   # or --release
  python3 benches/limit.py          # backups of 48 MiB at 1, 2, 4 MiB/s; restores of 96 MiB at 4, 8 MiB/s
  python3 benches/limit.py --quick  # 4 and 8 MiB, one run (checks the script works)

Binaries: SHMBACK_BIN_DIR (default target/release, else target/debug). The limited paths are
bound by the limit, not the engine, so a debug build (dependencies optimised) measures the same
ratios as a release build as long as the limits stay well below its unthrottled rate (printed).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
S3_KEYS = {"AWS_ACCESS_KEY_ID": "limitbench", "AWS_SECRET_ACCESS_KEY": "limitbenchsecret", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
NAMES = ("shmback", "shmback-send", "shmback-s3-server")


def bin_dir():
    given = os.environ.get("SHMBACK_BIN_DIR")
    if given:
        return os.path.abspath(given)
    for d in ("release", "debug"):
        if all(os.path.exists(os.path.join(TARGET, d, n)) for n in NAMES):
            return os.path.join(TARGET, d)
    sys.exit("shmback, shmback-send and shmback-s3-server are missing: run "
             "`cargo build -p shmback-uploader -p shmback-writer -p shmback-benches` (or point SHMBACK_BIN_DIR at them)")


def tree_bytes(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except FileNotFoundError:
                pass  # a temporary file of the server, gone meanwhile
    return total


def check(cmd, env, what):
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    if p.returncode != 0:
        sys.exit(f"{what} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def backup(bins, env, repo, bucket_dir, corpus, limit_kib, work):
    """Sends the corpus through a limited `shmback run`; returns (bytes uploaded, seconds)."""
    env = dict(env, RESTIC_REPOSITORY=repo)
    check([bins["shmback"], "init", "--create-bucket"], env, "shmback init")
    seg = f"/dev/shm/shmback-limit-bench-{os.getpid()}"
    log = open(os.path.join(work, "run.log"), "w")
    args = [bins["shmback"], "run", "--segment", seg]
    if limit_kib:
        args += ["--limit-upload", str(limit_kib)]
    up = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(seg):
            if time.monotonic() > deadline or up.poll() is not None:
                sys.exit(f"shmback run did not create {seg}:\n{open(log.name).read()}")
            time.sleep(0.02)
        time.sleep(0.5)  # the repository is open (config and keys read) before the segment exists
        before = tree_bytes(bucket_dir)
        t0 = time.monotonic()
        check([bins["shmback-send"], "--segment", seg, "--wait-durable", "--timeout", "900", corpus], env,
              "shmback-send")
        secs = time.monotonic() - t0
        return tree_bytes(bucket_dir) - before, secs
    finally:
        up.terminate()
        up.wait(timeout=60)
        log.close()
        if os.path.exists(seg):
            os.unlink(seg)


def restore(bins, env, repo, bucket_dir, corpus, limit_kib, work):
    """Restores the latest snapshot with the download limit; returns (bytes in the bucket, seconds)."""
    env = dict(env, RESTIC_REPOSITORY=repo)
    dest = tempfile.mkdtemp(prefix="restore-", dir=work)
    args = [bins["shmback"], "restore", "latest", dest]
    if limit_kib:
        args += ["--limit-download", str(limit_kib)]
    t0 = time.monotonic()
    check(args, env, "shmback restore")
    secs = time.monotonic() - t0
    got, want = tree_bytes(dest), tree_bytes(corpus)
    if got != want:
        sys.exit(f"the restore holds {got} bytes, the corpus {want}")
    shutil.rmtree(dest)
    return tree_bytes(bucket_dir), secs


def make_corpus(path, mib):
    """Random (incompressible) files of at most 8 MiB, `mib` MiB in all."""
    os.makedirs(path)
    left, i = mib, 0
    while left > 0:
        with open(os.path.join(path, f"random{i}.bin"), "wb") as f:
            f.write(os.urandom(min(8, left) << 20))
        left, i = left - 8, i + 1
    return path


def report(into, direction, limit, runs):
    """Prints and keeps the median bytes and time of `runs` against `limit` (KiB/s)."""
    nbytes = statistics.median(r[0] for r in runs)
    secs = statistics.median(r[1] for r in runs)
    rate = nbytes / secs / 1024
    into[limit] = {"runs": runs, "achieved_kib_s": rate, "ratio": rate / limit}
    print(f"{direction:<9} {limit:>11} {int(nbytes):>10} {secs:>9.2f} {rate:>14.0f} {rate / limit:>6.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=48, help="MiB of random files backed up at each upload limit")
    ap.add_argument("--download-mib", type=int, default=96, help="MiB of random files restored at each download limit")
    ap.add_argument("--upload", default="1024,2048,4096", help="upload limits, KiB/s, comma-separated")
    ap.add_argument("--download", default="4096,8192", help="download limits, KiB/s, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 MiB, one run (checks the script works)")
    ap.add_argument("--json", default=os.path.join(TARGET, "limit.json"), help="raw figures")
    args = ap.parse_args()
    if args.quick:
        args.mib, args.download_mib, args.runs = 4, 8, 1
    bins = {n: os.path.join(bin_dir(), n) for n in NAMES}
    uploads = [int(x) for x in args.upload.split(",") if x]
    downloads = [int(x) for x in args.download.split(",") if x]

    env = dict(os.environ, RESTIC_PASSWORD="limit-bench", **S3_KEYS)
    for v in ("RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND", "SHMBACK_LIMIT_UPLOAD", "SHMBACK_LIMIT_DOWNLOAD"):
        env.pop(v, None)
    # On tmpfs: the corpus and the restores never touch a disk (the limits are the bottleneck).
    work = tempfile.mkdtemp(prefix="shmback-limit-", dir="/dev/shm")
    s3_root = tempfile.mkdtemp(prefix="shmback-limit-s3-", dir="/dev/shm")
    server = subprocess.Popen([bins["shmback-s3-server"], s3_root, "0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    results = {"mib": args.mib, "runs": args.runs, "bin_dir": os.path.dirname(bins["shmback"]),
               "upload": {}, "download": {}}
    try:
        endpoint = "http://" + server.stdout.readline().split()[-1]
        corpus = make_corpus(os.path.join(work, "corpus"), args.mib)
        # Restores read a larger corpus: the fixed cost of a command (opening the repository,
        # reading the index) is then a smaller part of its time, as in a real restore.
        corpus_down = make_corpus(os.path.join(work, "corpus-down"), args.download_mib)
        buckets = iter(range(1_000_000))

        def bucket():
            b = f"limit-{next(buckets)}"
            return f"s3:{endpoint}/{b}/repo", os.path.join(s3_root, b)

        print(f"S3 server {endpoint}; corpora of random files: {args.mib} MiB backed up, {args.download_mib} MiB "
              f"restored; binaries {results['bin_dir']}", flush=True)
        down = bucket()
        sent, secs = backup(bins, env, *down, corpus_down, 0, work)
        print(f"unlimited backup: {sent / secs / 2**20:.1f} MiB/s ({sent} bytes in {secs:.2f} s)", flush=True)
        nbytes, rsecs = restore(bins, env, *down, corpus_down, 0, work)
        print(f"unlimited restore: {nbytes / rsecs / 2**20:.1f} MiB/s ({nbytes} bytes in {rsecs:.2f} s)", flush=True)
        results["unlimited"] = {"upload_bytes_per_s": sent / secs, "download_bytes_per_s": nbytes / rsecs}

        print(f"{'direction':<9} {'limit KiB/s':>11} {'bytes':>10} {'median s':>9} {'achieved KiB/s':>14} "
              f"{'ratio':>6}", flush=True)
        for limit in uploads:
            runs = [backup(bins, env, *bucket(), corpus, limit, work) for _ in range(args.runs)]
            report(results["upload"], "upload", limit, runs)
        for limit in downloads:
            runs = [restore(bins, env, *down, corpus_down, limit, work) for _ in range(args.runs)]
            report(results["download"], "download", limit, runs)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(s3_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"raw figures: {args.json}")


if __name__ == "__main__":
    main()
