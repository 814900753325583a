#!/usr/bin/env python3
"""End-to-end benchmark: one corpus, three pipelines, same run, repositories on tmpfs (/dev/shm).

  (a) shmback:  shmback-send -> /dev/shm ring -> `shmback run` (rustic_core), no staging copy
  (b) the usual handoff with the same engine: `cp -a` the tree into /dev/shm/outbox, then
      rustic_core's own local-path backup of the outbox (`shmback-rustic-backup`)
  (c) the same outbox, backed up by `restic backup`

Each pipeline runs on a fresh repository (first run), then again on the unchanged corpus (re-run;
(b) and (c) re-copy the outbox, as a handoff does each time). Reported per pipeline: median wall
time and throughput over --runs, ratios against (a) from the same runs, peak RSS of each process
(wait4's ru_maxrss) and peak /dev/shm bytes of the handoff (the segment for (a), sampled; the outbox
for (b) and (c)).

With --s3, a local S3 server (`shmback-s3-server`: s3s + s3s-fs, its data on /dev/shm) takes
the repositories instead, and the pipelines are:

  (a)  shmback to a repository on tmpfs (the reference for what the S3 path costs)
  (a3) shmback to the local S3 server
  (c3) `cp -a` into /dev/shm, then `restic backup` to the same S3 server

Corpora (--corpus, comma-separated, each measured in turn with all pipelines):

  mixed  the --doc tree plus --big-mib of large random files (64 MiB each)
  small  generated, deterministic from --seed: --small-mb of text-like, compressible files of
         1-64 KiB (log-uniform sizes, so most are small), in a tree 2-5 directories deep;
         about 32,000 files at the default 500 MB
  big    only the --big-mib of large random files

--compare-bin DIR adds (a) and (b) with the binaries of DIR (e.g. a copy of an earlier release
build), interleaved with the others in every run, so a before/after ratio comes from one run.

  cargo build --release -p shmback-uploader -p shmback-writer -p shmback-benches
  python3 benches/e2e.py                          # small, then mixed; 3 runs each
  python3 benches/e2e.py --quick                  # small corpora, 1 run (CI: it works)
  python3 benches/e2e.py --s3                     # S3: shmback vs restic to the same server
"""

import argparse
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Release binaries; SHMBACK_BIN_DIR points elsewhere (CI's --quick run checks the script with the
# test build's binaries; figures come from release builds only).
REL = os.environ.get("SHMBACK_BIN_DIR") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
BIN = {n: os.path.join(REL, n) for n in ("shmback", "shmback-send", "shmback-rustic-backup", "shmback-s3-server")}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "e2ebench", "AWS_SECRET_ACCESS_KEY": "e2ebenchsecret", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
PASSWORD = "e2e-bench"


def run(cmd, env=None):
    """Runs cmd to completion: (seconds, peak RSS in bytes).

    The peak RSS comes from GNU time (`%M`), not from wait4 here: Linux carries a process's peak
    RSS across exec, so a child forked from this Python process would report Python's own size.
    """
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", rss.name] + cmd, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')}")
        return elapsed, int(rss.read().split()[-1]) * 1024


def vm_hwm(pid):
    """Peak RSS of a running process (VmHWM: this image's own, reset at exec)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_bytes(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            total += st.st_blocks * 512
    return total


def text_pool(rng, size):
    """`size` bytes of text-like data: lines of words from a Zipf-weighted vocabulary (zstd at
    level 3 makes about 28 % of it)."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(1, 10)))
             for _ in range(4000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    out, n = [], 0
    while n < size:
        words = rng.choices(vocab, weights=weights, k=4096)
        lines = []
        i = 0
        while i < len(words):
            k = rng.randint(4, 14)
            lines.append(" ".join(words[i:i + k]))
            i += k
        chunk = ("\n".join(lines) + "\n").encode()
        out.append(chunk)
        n += len(chunk)
    return b"".join(out)[:size]


def make_small_files(dst, total_bytes, seed):
    """Many small text-like files in a deep tree, the same bytes for the same seed and size.

    Sizes are log-uniform in 1-64 KiB (median ~8 KiB); each file starts with a line naming it, so
    no two files are the same blob; the rest is a slice of one 16 MiB text pool at a random offset.
    Directories are 2-5 levels deep, 4 wide per level (about 1,300 of them)."""
    rng = random.Random(seed)
    pool = text_pool(rng, 16 << 20)
    pool += pool[:64 << 10]  # a slice may run past the end
    written = i = 0
    while written < total_bytes:
        depth = rng.randint(2, 5)
        d = os.path.join(dst, *(f"d{rng.randrange(4)}" for _ in range(depth)))
        size = min(int(math.exp(rng.uniform(math.log(1024), math.log(64 << 10)))), total_bytes - written)
        head = f"file {i} seed {seed} size {size}\n".encode()
        off = rng.randrange(len(pool) - (64 << 10))
        data = (head + pool[off:off + size])[:size]
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:06d}.txt"), "wb") as f:
            f.write(data)
        written += size
        i += 1


def make_corpus(dst, doc, big_mib, small_bytes=0, seed=0):
    os.makedirs(dst)
    if small_bytes:
        make_small_files(os.path.join(dst, "small"), small_bytes, seed)
    if doc:
        shutil.copytree(doc, os.path.join(dst, "doc"), symlinks=True)
    big = os.path.join(dst, "big")
    os.makedirs(big)
    left = big_mib << 20
    i = 0
    while left > 0:
        n = min(left, 64 << 20)
        with open(os.path.join(big, f"blob{i}.bin"), "wb") as f:
            f.write(os.urandom(n))
        left -= n
        i += 1
    files = size = 0
    for d, _, fs in os.walk(dst):
        for f in fs:
            st = os.lstat(os.path.join(d, f))
            files += 1
            size += st.st_size
    return files, size


class Sampler:
    """Samples the allocated bytes of one file every 5 ms; keeps the peak."""

    def __init__(self, path):
        self.path, self.peak, self.stop = path, 0, False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stop:
            try:
                self.peak = max(self.peak, os.stat(self.path).st_blocks * 512)
            except FileNotFoundError:
                pass
            time.sleep(0.005)

    def done(self):
        self.stop = True
        self.t.join()
        return self.peak


def pipeline_a(work, corpus, env, repo=None, bins=None):
    bins = bins or BIN
    repo = repo or os.path.join(work, "repo-a")
    seg = f"/dev/shm/shmback-e2e-{os.getpid()}"
    e = dict(env, RESTIC_REPOSITORY=repo)
    run([bins["shmback"], "init", "--create-bucket"] if repo.startswith("s3:") else [bins["shmback"], "init"], e)
    up = subprocess.Popen([bins["shmback"], "run", "--segment", seg], env=e,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1000):
            if os.path.exists(seg):
                break
            time.sleep(0.01)
        sampler = Sampler(seg)
        send = [bins["shmback-send"], "--segment", seg, "--wait-durable", "--timeout", "600", corpus]
        first, rss_send = run(send, e)
        again, rss_send2 = run(send, e)
        shm_peak = sampler.done()
        rss_up = vm_hwm(up.pid)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait()
        if os.path.exists(seg):
            os.unlink(seg)
    return {"first": first, "rerun": again, "shm_peak": shm_peak,
            "rss": {"shmback-send": max(rss_send, rss_send2), "shmback run": rss_up}}


def staged(work, corpus, env, name, backup):
    """(b)/(c): copy into a /dev/shm outbox, then back it up; twice (fresh repo, then unchanged)."""
    outbox = f"/dev/shm/shmback-e2e-outbox-{os.getpid()}"
    res = {"rss": {}}
    try:
        for phase in ("first", "rerun"):
            shutil.rmtree(outbox, ignore_errors=True)
            t_cp, rss_cp = run(["cp", "-a", corpus, outbox])
            res["shm_peak"] = tree_bytes(outbox)
            t_bk, rss_bk = backup(outbox, phase)
            res[phase] = t_cp + t_bk
            res[phase + "_copy"] = t_cp
            res["rss"]["cp"] = max(res["rss"].get("cp", 0), rss_cp)
            res["rss"][name] = max(res["rss"].get(name, 0), rss_bk)
    finally:
        shutil.rmtree(outbox, ignore_errors=True)
    return res


def pipeline_b(work, corpus, env, bins=None):
    bins = bins or BIN
    repo = os.path.join(work, "repo-b")
    run([bins["shmback"], "init"], dict(env, RESTIC_REPOSITORY=repo))
    return staged(work, corpus, env, "rustic_core backup",
                  lambda outbox, _: run([bins["shmback-rustic-backup"], repo, outbox], env))


def pipeline_c(work, corpus, env, repo=None):
    repo = repo or os.path.join(work, "repo-c")
    e = dict(env, RESTIC_REPOSITORY=repo, RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"))
    run(["restic", "init"], e)
    return staged(work, corpus, e, "restic backup",
                  lambda outbox, _: run(["restic", "backup", "--quiet", outbox], e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", default="/usr/share/doc", help="a tree of many small files to include")
    ap.add_argument("--big-mib", type=int, default=256, help="MiB of large incompressible files to add")
    ap.add_argument("--corpus", default="small,mixed",
                    help="comma-separated corpora to measure in turn: small, mixed, big (see above)")
    ap.add_argument("--small-mb", type=int, default=500, help="MB of the generated small-files corpus")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated small-files corpus")
    ap.add_argument("--compare-bin", default=None,
                    help="also run (a) and (b) with the binaries in this directory (before/after)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small corpus, one run (checks the script works)")
    ap.add_argument("--s3", action="store_true", help="repositories on a local S3 server: shmback vs restic")
    ap.add_argument("--json", default=None, help="raw figures (default target/e2e.json, target/e2e-s3.json)")
    args = ap.parse_args()
    args.json = args.json or os.path.join(ROOT, "target", "e2e-s3.json" if args.s3 else "e2e.json")
    if args.quick:
        args.big_mib, args.runs, args.small_mb = 8, 1, 8
    corpora = [c.strip() for c in args.corpus.split(",") if c.strip()]
    for c in corpora:
        if c not in ("small", "mixed", "big"):
            sys.exit(f"unknown corpus {c!r}: use small, mixed or big")
    old = None
    if args.compare_bin:
        old = {n: os.path.join(args.compare_bin, n) for n in BIN}
    build = "cargo build --release -p shmback-uploader -p shmback-writer -p shmback-benches"
    for b in (v for bins in (BIN, old or {}) for k, v in bins.items() if args.s3 or k != "shmback-s3-server"):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: run `{build}` first (or point SHMBACK_BIN_DIR at the binaries)")
    for tool, pkg in (("restic", "restic"), ("/usr/bin/time", "time")):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install {pkg}")
    env = dict(os.environ, RESTIC_PASSWORD=PASSWORD)
    for v in ("RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND", "RESTIC_REPOSITORY"):
        env.pop(v, None)

    base = tempfile.mkdtemp(prefix="shmback-e2e-")
    server = None
    if args.s3:
        s3_root = tempfile.mkdtemp(prefix="shmback-e2e-s3-", dir="/dev/shm")
        env.update(S3_KEYS)
        server = subprocess.Popen([BIN["shmback-s3-server"], s3_root, "0"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        endpoint = "http://" + server.stdout.readline().split()[-1]
        print(f"S3 server {endpoint}, data in {s3_root}", flush=True)
        bucket_seq = itertools.count()
        # Bucket per pipeline and run; restic creates its own bucket at init, as shmback does with
        # --create-bucket.
        pipelines = (("a", pipeline_a),
                     ("a3", lambda w, c, e: pipeline_a(w, c, e, f"s3:{endpoint}/a3-{next(bucket_seq)}")),
                     ("c3", lambda w, c, e: pipeline_c(w, c, e, f"s3:{endpoint}/c3-{next(bucket_seq)}")))
    else:
        pipelines = (("a", pipeline_a), ("b", pipeline_b), ("c", pipeline_c))
    if old:
        pipelines += (("a0", lambda w, c, e: pipeline_a(w, c, e, bins=old)),
                      ("b0", lambda w, c, e: pipeline_b(w, c, e, bins=old)))
    all_results = {}
    try:
        for name in corpora:
            all_results[name] = measure(args, name, base, env, pipelines)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if server:
            server.kill()
            server.wait()
            shutil.rmtree(s3_root, ignore_errors=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(all_results, f, indent=1)
    print(f"raw figures: {args.json}")


def measure(args, name, base, env, pipelines):
    """Runs every pipeline --runs times on one corpus, interleaved; prints the table."""
    keys = [k for k, _ in pipelines]
    base_key = "a3" if args.s3 else "a"
    corpus = os.path.join(base, "corpus-" + name)
    try:
        doc = args.doc if name == "mixed" else None
        big_mib = 0 if name == "small" else args.big_mib
        small = args.small_mb * 1000 * 1000 if name == "small" else 0
        if doc and args.quick:
            # A slice of the doc tree: enough files to exercise the per-file paths.
            doc = os.path.join(base, "doc-slice")
            os.makedirs(doc)
            for entry in sorted(os.listdir(args.doc))[:150]:
                src = os.path.join(args.doc, entry)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, os.path.join(doc, entry), symlinks=True)
        files, size = make_corpus(corpus, doc if doc and os.path.isdir(doc) else None, big_mib, small, args.seed)
        print(f"\ncorpus {name}: {files} files, {size / 1e6:.1f} MB ({big_mib} MiB of it in large files); "
              f"{args.runs} run(s), repositories on {'the local S3 server' if args.s3 else '/dev/shm'}", flush=True)
        results = {k: [] for k in keys}
        for r in range(args.runs):
            for key, fn in pipelines:
                work = tempfile.mkdtemp(prefix=f"run{r}-{key}-", dir="/dev/shm")
                try:
                    results[key].append(fn(work, corpus, env))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                x = results[key][-1]
                print(f"  run {r + 1} ({key}): first {x['first']:.2f} s, re-run {x['rerun']:.2f} s", flush=True)
    finally:
        shutil.rmtree(corpus, ignore_errors=True)

    med = {k: {p: statistics.median(x[p] for x in v) for p in ("first", "rerun")} for k, v in results.items()}
    names = {"a": "(a) shmback: ring -> rustic_core", "b": "(b) cp to /dev/shm + rustic_core backup",
             "c": "(c) cp to /dev/shm + restic backup", "a3": "(a3) shmback: ring -> rustic_core -> S3",
             "c3": "(c3) cp to /dev/shm + restic backup -> S3",
             "a0": "(a) shmback, --compare-bin build", "b0": "(b) cp + rustic_core backup, --compare-bin build"}
    print()
    print(f"| pipeline | first run | MB/s | ({base_key}) is × faster | re-run unchanged | ({base_key}) re-run is × faster "
          "| peak RSS | peak /dev/shm |")
    print("|---|---|---|---|---|---|---|---|")
    for k in keys:
        m = med[k]
        # Ratios per run (same run, same machine state), then their median.
        r1 = statistics.median(x["first"] / a["first"] for x, a in zip(results[k], results[base_key]))
        r2 = statistics.median(x["rerun"] / a["rerun"] for x, a in zip(results[k], results[base_key]))
        rss = max(results[k], key=lambda x: x["first"])["rss"]
        rss_s = ", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in rss.items())
        shm = max(x["shm_peak"] for x in results[k])
        print(f"| {names[k]} | {m['first']:.2f} s | {size / 1e6 / m['first']:.0f} | "
              f"{'—' if k == base_key else f'{r1:.2f}×'} | {m['rerun']:.2f} s | "
              f"{'—' if k == base_key else f'{r2:.2f}×'} | "
              f"{rss_s} | {shm / 2**20:.1f} MiB |")
    for k in (k for k in keys if k.startswith(("b", "c"))):
        cp = statistics.median(x["first_copy"] for x in results[k])
        print(f"\n{names[k]}: of its first run, the copy into /dev/shm took {cp:.2f} s", end="")
    print()
    return {"files": files, "bytes": size, "runs": results}


if __name__ == "__main__":
    main()
