#!/usr/bin/env python3
"""Transport benchmark: moving a tree from one service to the backup service, four ways, same run.

  (r) ring:       `shmback run --segment SEG` + `shmback-send --segment SEG --wait-durable TREE`
                  (same host, /dev/shm; the reference for what the network path costs)
  (h) HTTP push:  `shmback run --listen 127.0.0.1:PORT` + `shmback-send --to http://… --wait-durable`
  (p) HTTP pull:  `shmback-send --serve 127.0.0.1:PORT --once TREE`, then `shmback run --pull URL`
                  (time from the producer's start to its exit: it exits on the durable ack; the
                  uploader is started per run, so its repository opening is inside the time)
  (t) the usual separate-services pipeline: `tar -c` writing straight into a TCP socket on the
      producer side, `tar -x` reading straight from the accepted socket into a staging directory on
      disk on the backup side (no relay process: the cheapest form of `tar c | nc` / `nc -l | tar x`),
      then `restic backup STAGING`. The re-run streams the whole tar again into the same staging
      directory (tar replaces each file), then `restic backup` again, as such pipelines do.

Each variant runs on a fresh repository on /dev/shm (first run), then again on the unchanged tree
(re-run); variants are interleaved within each of --runs rounds (the order rotates per round), and
ratios are taken per round, then their median. (r) and (h) time the producer against an uploader
that is already running (repository open); (p) and (t) include opening the repository.

Reported per variant: median wall time and throughput, ratios against (t) and (r), the peak RSS of
each process (GNU time's %M; the daemon's VmHWM), and the backup side's disk use for staging: the
staging directory's allocated bytes for (t); for the uploader, the peak size of its working and
temporary directory (on the same disk) and the bytes it wrote to block storage (/proc/PID/io
write_bytes; its repository and cache are on tmpfs, so anything written there is staging).

  cargo build --release -p shmback-uploader -p shmback-writer && python3 benches/transport.py
  python3 benches/transport.py --runs 5 --staging-dir /var/tmp     # staging on another disk
  SHMBACK_BIN_DIR=target/debug python3 benches/transport.py --quick # CI: every variant works,
                                                                    # (h) and (p) restore byte-exact

The corpus is generated deterministically (seeded): a doc-like tree of many small text files (some
gzip-compressed, a few symlinks) plus large incompressible files; ~310 MB by default, ~20 MB with
--quick. Exit status is non-zero if any variant fails or a restore differs from the corpus.
"""

import argparse
import gzip
import hashlib
import collections
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Release binaries; SHMBACK_BIN_DIR points elsewhere (CI's --quick run checks the script with the
# test build's binaries; figures come from release builds only).
# Absolute: the daemons run in their own scratch directories (CI passes target/debug).
BIN_DIR = os.path.abspath(os.environ.get("SHMBACK_BIN_DIR") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release"))
SHMBACK = os.path.join(BIN_DIR, "shmback")
SEND = os.path.join(BIN_DIR, "shmback-send")
PASSWORD = "transport-bench"
TIMEOUT = 900  # seconds any one step may take before the benchmark gives up on it
NAMES = {"r": "(r) ring, same host", "h": "(h) HTTP push", "p": "(p) HTTP pull",
         "t": "(t) tar over TCP → staging on disk → restic backup"}


# One finished process: wall seconds, peak RSS bytes, bytes written to block storage, CPU seconds.
Done = collections.namedtuple("Done", "t rss written cpu")


class Failure(Exception):
    """A variant failed: the benchmark exits non-zero with this message."""


# ---------------------------------------------------------------------------------------------
# Corpus


def make_corpus(dst, small_files, big_mib, seed=20261130):
    """A deterministic doc-like tree: `small_files` text files (64 B - 48 KiB, log-uniform; one in
    five gzip-compressed like Debian's changelogs) in package directories, a few symlinks, and
    `big_mib` MiB of incompressible data in files of up to 64 MiB. Returns (files, bytes)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(6000)]
    doc = os.path.join(dst, "doc")
    os.makedirs(doc)
    pkg = None
    for i in range(small_files):
        if i % 20 == 0:
            pkg = os.path.join(doc, f"pkg-{vocab[i % len(vocab)]}-{i // 20}")
            os.makedirs(os.path.join(pkg, "examples"))
        size = int(64 * (768 ** rng.random()))  # 64 B .. 48 KiB
        words = rng.choices(vocab, k=size // 6 + 1)
        lines = [" ".join(words[j:j + 12]) for j in range(0, len(words), 12)]
        text = ("\n".join(lines) + "\n").encode()[:size]
        sub = "examples" if i % 7 == 3 else ""
        if i % 5 == 0:
            with open(os.path.join(pkg, sub, f"changelog{i}.gz"), "wb") as f:
                f.write(gzip.compress(text, mtime=0))
        else:
            with open(os.path.join(pkg, sub, f"doc{i}.txt"), "wb") as f:
                f.write(text)
        if i % 97 == 0:
            os.symlink(f"doc{i}.txt" if i % 5 else f"changelog{i}.gz", os.path.join(pkg, f"link{i}"))
    big = os.path.join(dst, "big")
    os.makedirs(big)
    left, i = big_mib << 20, 0
    while left > 0:
        n = min(left, 64 << 20)
        with open(os.path.join(big, f"blob{i}.bin"), "wb") as f:
            for _ in range(0, n, 8 << 20):
                f.write(rng.randbytes(min(8 << 20, n)))
        left -= n
        i += 1
    files = size = 0
    for d, _, fs in os.walk(dst):
        for f in fs:
            st = os.lstat(os.path.join(d, f))
            files += 1
            size += st.st_size
    return files, size


def tree_bytes(path):
    """Allocated bytes of a tree (what it costs on its volume)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def tree_digest(path):
    """{relative path: (kind, mode, content digest or link target)} of every entry under path."""
    out = {}
    for d, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, path)
            st = os.lstat(p)
            mode = st.st_mode & 0o7777
            if os.path.islink(p):
                out[rel] = ("link", 0, os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", mode, "")
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[rel] = ("file", mode, h.hexdigest())
    return out


# ---------------------------------------------------------------------------------------------
# Processes


class Timed:
    """A process under GNU time: wall time from start to exit, peak RSS (%M) and the bytes it
    wrote to block storage (%O: file system outputs, 512-byte units).

    GNU time, not wait4 here: Linux carries a process's peak RSS across exec, so a child forked
    from this Python process would report Python's own size. stderr goes to a file, not a pipe, so
    a chatty process never blocks while another one is being waited for."""

    def __init__(self, cmd, env, stdin=None, stdout=subprocess.DEVNULL, cwd=None):
        self.cmd = cmd
        self.stats = tempfile.NamedTemporaryFile(mode="r", prefix="tbench-time-")
        self.err = tempfile.TemporaryFile(prefix="tbench-err-")
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M %O %U %S", "-o", self.stats.name] + cmd,
                                  env=env, stdin=stdin, stdout=stdout, stderr=self.err, cwd=cwd)

    def wait(self, timeout=TIMEOUT):
        """A `Done`; raises Failure on a non-zero exit."""
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise Failure(f"{' '.join(self.cmd)} took over {timeout} s")
        elapsed = time.perf_counter() - self.t0
        if self.p.returncode != 0:
            self.err.seek(0)
            raise Failure(f"{' '.join(self.cmd)} failed (exit {self.p.returncode}):\n"
                          f"{self.err.read().decode(errors='replace')[-4000:]}")
        rss_kib, out_blocks, user, system = self.stats.read().split()[-4:]
        return Done(elapsed, int(rss_kib) * 1024, int(out_blocks) * 512, float(user) + float(system))

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def run(cmd, env, **kw):
    return Timed(cmd, env, **kw).wait()


class Daemon:
    """`shmback run …` in the background, in its own working and temporary directory on the
    staging disk (so anything it stages shows up there). Ready once its log says `ready`."""

    def __init__(self, args, env, scratch, ready):
        os.makedirs(scratch)
        self.scratch = scratch
        self.log = open(os.path.join(os.path.dirname(scratch), os.path.basename(scratch) + ".log"), "w+")
        self.cmd = [SHMBACK, "run"] + args
        self.p = subprocess.Popen(self.cmd, env=dict(env, TMPDIR=scratch), cwd=scratch,
                                  stdout=self.log, stderr=subprocess.STDOUT)
        self.peak_scratch, self.stopped = 0, False
        self.sampler = threading.Thread(target=self.sample, daemon=True)
        self.sampler.start()
        deadline = time.monotonic() + 120
        while ready not in self.text():
            if self.p.poll() is not None:
                raise Failure(f"{' '.join(self.cmd)} exited ({self.p.returncode}) at start:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise Failure(f"{' '.join(self.cmd)} did not log {ready!r} within 120 s:\n{self.text()[-4000:]}")
            time.sleep(0.01)

    def text(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def sample(self):
        while not self.stopped:
            self.peak_scratch = max(self.peak_scratch, tree_bytes(self.scratch))
            time.sleep(0.05)

    def cpu(self):
        """CPU seconds (user + system) it has used so far."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self):
        if self.p.poll() is not None:
            raise Failure(f"{' '.join(self.cmd)} exited ({self.p.returncode}):\n{self.text()[-4000:]}")

    def stop(self):
        """Stops it (SIGTERM); (peak RSS, bytes written to block storage, peak scratch bytes)."""
        rss = written = 0
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                rss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
            with open(f"/proc/{self.p.pid}/io") as f:
                written = next(int(ln.split()[1]) for ln in f if ln.startswith("write_bytes:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise Failure(f"{' '.join(self.cmd)} did not stop within 60 s of SIGTERM")
        finally:
            self.stopped = True
            self.sampler.join()
        if self.p.returncode != 0:
            raise Failure(f"{' '.join(self.cmd)} exited {self.p.returncode} on SIGTERM:\n{self.text()[-4000:]}")
        return rss, written, max(self.peak_scratch, tree_bytes(self.scratch))

    def kill(self):
        self.stopped = True
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            proc.wait()  # raises with its stderr
            raise Failure(f"{' '.join(proc.cmd)} exited before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise Failure(f"nothing listening on 127.0.0.1:{port} after {seconds} s")


# ---------------------------------------------------------------------------------------------
# Variants. Each returns {"first": s, "rerun": s, "rss": {process: bytes}, "staging": bytes,
# "written": bytes}; `work` is on /dev/shm (repository, caches), `disk` on the staging volume.


def repo_env(env, work, disk=None):
    """The repository and the caches on tmpfs; temporary files (restic spools packs there) on
    the staging volume, where they count as the backup side's disk use."""
    e = dict(env, RESTIC_REPOSITORY=os.path.join(work, "repo"), XDG_CACHE_HOME=os.path.join(work, "cache"),
             RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"))
    if disk:
        os.makedirs(os.path.join(disk, "tmp"), exist_ok=True)
        e["TMPDIR"] = os.path.join(disk, "tmp")
    return e


def variant_r(work, disk, corpus, env):
    e = repo_env(env, work)
    seg = os.path.join(work, "segment")
    run([SHMBACK, "init"], e)
    up = Daemon(["--segment", seg], e, os.path.join(disk, "uploader"), ready="serving")
    res = {"rss": {}}
    try:
        for phase in ("first", "rerun"):
            cpu0 = up.cpu()
            d = run([SEND, "--segment", seg, "--wait-durable", "--timeout", str(TIMEOUT), corpus], e)
            up.alive()
            res[phase] = d.t
            res["cpu_" + phase] = {"shmback-send": d.cpu, "shmback run": up.cpu() - cpu0}
            res["rss"]["shmback-send"] = max(res["rss"].get("shmback-send", 0), d.rss)
        res["rss"]["shmback run"], res["written"], res["staging"] = up.stop()
    finally:
        up.kill()
    return res


def variant_h(work, disk, corpus, env):
    e = dict(repo_env(env, work), SHMBACK_TOKEN=secrets.token_hex(16))
    run([SHMBACK, "init"], e)
    port = free_port()
    up = Daemon(["--listen", f"127.0.0.1:{port}"], e, os.path.join(disk, "uploader"),
                ready="listening for batches over HTTP")
    res = {"rss": {}}
    try:
        for phase in ("first", "rerun"):
            cpu0 = up.cpu()
            d = run([SEND, "--to", f"http://127.0.0.1:{port}", "--wait-durable", "--timeout", str(TIMEOUT), corpus], e)
            up.alive()
            res[phase] = d.t
            res["cpu_" + phase] = {"shmback-send": d.cpu, "shmback run": up.cpu() - cpu0}
            res["rss"]["shmback-send"] = max(res["rss"].get("shmback-send", 0), d.rss)
        res["rss"]["shmback run"], res["written"], res["staging"] = up.stop()
    finally:
        up.kill()
    return res


def variant_p(work, disk, corpus, env):
    e = dict(repo_env(env, work), SHMBACK_TOKEN=secrets.token_hex(16))
    run([SHMBACK, "init"], e)
    res = {"rss": {}, "written": 0, "staging": 0}
    for phase in ("first", "rerun"):
        port = free_port()
        producer = Timed([SEND, "--serve", f"127.0.0.1:{port}", "--once", corpus], e)
        up = None
        try:
            wait_port(port, producer)
            up = Daemon(["--pull", f"http://127.0.0.1:{port}"], e, os.path.join(disk, f"uploader-{phase}"),
                        ready="pulling batches")
            res[phase + "_startup"] = time.perf_counter() - producer.t0
            d = producer.wait()
            up_cpu = up.cpu()
            up_rss, written, staged = up.stop()
        finally:
            producer.kill()
            if up:
                up.kill()
        res[phase] = d.t
        res["cpu_" + phase] = {"shmback-send --serve": d.cpu, "shmback run": up_cpu}
        for name, v in (("shmback-send --serve", d.rss), ("shmback run", up_rss)):
            res["rss"][name] = max(res["rss"].get(name, 0), v)
        res["written"] += written
        res["staging"] = max(res["staging"], staged)
    return res


def variant_t(work, disk, corpus, env):
    e = repo_env(env, work, disk)
    staging = os.path.join(disk, "staging")
    os.makedirs(staging)
    run(["restic", "init"], e)
    parent, name = os.path.split(corpus)
    res = {"rss": {}, "written": 0, "staging": 0}
    for phase in ("first", "rerun"):
        t0 = time.perf_counter()
        with socket.create_server(("127.0.0.1", 0)) as srv:
            port = srv.getsockname()[1]
            out = socket.create_connection(("127.0.0.1", port))
            src = Timed(["tar", "-c", "-f", "-", "-C", parent, name], env, stdout=out.fileno())
            out.close()  # tar holds the only writer: its exit is the receiver's EOF
            srv.settimeout(60)
            conn, _ = srv.accept()
            dst = Timed(["tar", "-x", "-f", "-", "-C", staging], e, stdin=conn.fileno())
            conn.close()
        try:
            dc = src.wait()
            dx = dst.wait()
        finally:
            src.kill()
            dst.kill()
        t_copy = time.perf_counter() - t0
        db = run(["restic", "backup", "--quiet", os.path.join(staging, name)], e)
        res[phase] = t_copy + db.t
        res[phase + "_copy"] = t_copy
        res["cpu_" + phase] = {"tar -c": dc.cpu, "tar -x": dx.cpu, "restic backup": db.cpu}
        for k, v in (("tar -c", dc.rss), ("tar -x", dx.rss), ("restic backup", db.rss)):
            res["rss"][k] = max(res["rss"].get(k, 0), v)
        res["written"] += dx.written + db.written
        res["staging"] = max(res["staging"], tree_bytes(staging) + tree_bytes(e["TMPDIR"]))
    # Flush the staging writes now, outside any timing, so the next variant is not charged for
    # their writeback.
    subprocess.run(["sync", "-f", staging], check=False)
    return res


VARIANTS = {"r": variant_r, "h": variant_h, "p": variant_p, "t": variant_t}


def restore_check(key, corpus, env, expect):
    """Restores (key)'s latest snapshot from a fresh run and compares it with the corpus."""
    work = tempfile.mkdtemp(prefix=f"tbench-restore-{key}-", dir="/dev/shm")
    disk = tempfile.mkdtemp(prefix=f"tbench-restore-{key}-", dir=ARGS.staging_dir)
    try:
        VARIANTS[key](work, disk, corpus, env)
        e = repo_env(env, work)
        dest = os.path.join(work, "restored")
        run([SHMBACK, "restore", "latest", dest], e)
        got = tree_digest(os.path.join(dest, corpus.lstrip("/")))
        if got != expect:
            missing = sorted(set(expect) - set(got))[:5]
            extra = sorted(set(got) - set(expect))[:5]
            differ = sorted(k for k in set(got) & set(expect) if got[k] != expect[k])[:5]
            raise Failure(f"{NAMES[key]}: the restore differs from the corpus: missing {missing}, "
                          f"extra {extra}, different {differ}")
        print(f"  restore check {NAMES[key]}: {len(got)} entries byte-exact", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


# ---------------------------------------------------------------------------------------------


def fs_type(path):
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-files", type=int, default=6000, help="small text files in the corpus")
    ap.add_argument("--big-mib", type=int, default=256, help="MiB of large incompressible files")
    ap.add_argument("--runs", type=int, default=3, help="rounds (each runs every variant, first + re-run)")
    ap.add_argument("--only", default="rhpt", help="variants to run, e.g. `ht` (t is the baseline)")
    ap.add_argument("--staging-dir", default=None,
                    help="a directory on disk (not tmpfs) for (t)'s staging and the uploaders' working dirs "
                         "(default: the temporary directory, else /var/tmp)")
    ap.add_argument("--quick", action="store_true",
                    help="~20 MB corpus, one round, plus a restore check of (h) and (p) (CI)")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "transport.json"), help="raw figures")
    ARGS = args = ap.parse_args()
    if args.quick:
        args.small_files, args.big_mib, args.runs = 1500, 8, 1
    keys = [k for k in "rhpt" if k in args.only]
    if not keys or set(args.only) - set("rhpt"):
        sys.exit("--only takes letters of rhpt")
    for b in (SHMBACK, SEND):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: run `cargo build --release -p shmback-uploader -p shmback-writer` "
                     "or set SHMBACK_BIN_DIR")
    for tool, pkg in (("restic", "restic"), ("/usr/bin/time", "time"), ("tar", "tar")):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y {pkg}")
    if args.staging_dir is None:
        # /var/tmp is on disk where /tmp is tmpfs.
        args.staging_dir = next((d for d in (tempfile.gettempdir(), "/var/tmp") if fs_type(d) not in ("tmpfs", "ramfs")),
                                tempfile.gettempdir())
    if fs_type(args.staging_dir) in ("tmpfs", "ramfs") and args.quick:
        print(f"warning: --staging-dir {args.staging_dir} is {fs_type(args.staging_dir)}, not a disk: fine for "
              "checking that every variant works, not for figures", file=sys.stderr)
    elif fs_type(args.staging_dir) in ("tmpfs", "ramfs"):
        sys.exit(f"--staging-dir {args.staging_dir} is {fs_type(args.staging_dir)}: staging must be on disk, "
                 "as a backup service's volume is (pick a directory on a disk)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHMBACK_", "RESTIC_", "AWS_")) or k == "SHMBACK_BIN_DIR"}
    env["RESTIC_PASSWORD"] = PASSWORD

    base = tempfile.mkdtemp(prefix="tbench-corpus-")
    # Staging trees are removed only at the end: ext4 avoids reusing an inode deleted in the last
    # minute or so (ialloc.c, recently_deleted), and thousands of them deleted between rounds made
    # the next round's `tar -x` several times slower (sys time in find_inode_bit), a cost of this
    # benchmark's loop, not of the pipeline.
    disks = []
    load0 = os.getloadavg()
    try:
        corpus = os.path.join(base, "corpus")
        files, size = make_corpus(corpus, args.small_files, args.big_mib)
        print(f"corpus: {files} files, {size / 1e6:.1f} MB ({args.big_mib} MiB in large files); {args.runs} round(s); "
              f"repositories on /dev/shm, staging in {args.staging_dir} ({fs_type(args.staging_dir)}); "
              f"binaries {BIN_DIR}; load average {load0[0]:.1f}", flush=True)
        results = {k: [] for k in keys}
        for r in range(args.runs):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                work = tempfile.mkdtemp(prefix=f"tbench-{r}-{key}-", dir="/dev/shm")
                disk = tempfile.mkdtemp(prefix=f"tbench-{r}-{key}-", dir=args.staging_dir)
                disks.append(disk)
                try:
                    x = VARIANTS[key](work, disk, corpus, env)
                except Failure as err:
                    raise Failure(f"{NAMES[key]}, round {r + 1}: {err}") from None
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                results[key].append(x)
                print(f"  round {r + 1} {NAMES[key]}: first {x['first']:.2f} s, re-run {x['rerun']:.2f} s", flush=True)
        if args.quick:
            expect = tree_digest(corpus)
            for key in (k for k in ("h", "p") if k in keys):
                restore_check(key, corpus, env, expect)
    except Failure as err:
        sys.exit(f"FAILED: {err}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for d in disks:
            shutil.rmtree(d, ignore_errors=True)
    load1 = os.getloadavg()

    print()
    if args.quick:
        print("--quick: a check that every variant works; its figures (small corpus, one round) are not results\n")
    report(results, keys, size)
    print(f"\nload average (1 min) {load0[0]:.1f} at start, {load1[0]:.1f} at end, on {os.cpu_count()} CPUs")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"files": files, "bytes": size, "load": [load0, load1], "runs": results}, f, indent=1)
    print(f"raw figures: {args.json}")


def ratio(results, a, b, phase):
    """Median over rounds of a's time / b's time (same round)."""
    return statistics.median(x[phase] / y[phase] for x, y in zip(results[a], results[b]))


def report(results, keys, size):
    med = {k: {p: statistics.median(x[p] for x in v) for p in ("first", "rerun")} for k, v in results.items()}
    print("| variant | first run | MB/s | × faster than (t) | ÷ (r) | re-run unchanged | MB/s | × faster than (t) "
          "| ÷ (r) | peak RSS | backup-side staging disk |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        cells = [NAMES[k]]
        for p in ("first", "rerun"):
            cells += [f"{med[k][p]:.2f} s", f"{size / 1e6 / med[k][p]:.0f}",
                      "—" if k == "t" or "t" not in keys else f"{ratio(results, 't', k, p):.2f}×",
                      "—" if k == "r" or "r" not in keys else f"{ratio(results, k, 'r', p):.2f}"]
        rss = {}
        for x in results[k]:
            for n, v in x["rss"].items():
                rss[n] = max(rss.get(n, 0), v)
        cells.append(", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in rss.items()))
        staging = max(x["staging"] for x in results[k])
        written = max(x["written"] for x in results[k])
        cells.append(f"{staging / 2**20:.1f} MiB (wrote {written / 2**20:.1f} MiB)")
        print("| " + " | ".join(cells) + " |")
    if "t" in keys:
        copy = statistics.median(x["first_copy"] for x in results["t"])
        copy2 = statistics.median(x["rerun_copy"] for x in results["t"])
        print(f"\n(t): the tar stream into staging took {copy:.2f} s of its first run, {copy2:.2f} s of its re-run")
    if "p" in keys:
        up1 = statistics.median(x["first_startup"] for x in results["p"])
        up2 = statistics.median(x["rerun_startup"] for x in results["p"])
        print(f"(p): the uploader's start (repository opened, until it pulls) took {up1:.2f} s of its first run, "
              f"{up2:.2f} s of its re-run")
    print("\nCPU seconds per process (median over rounds), first run / re-run:")
    for k in keys:
        procs = results[k][0]["cpu_first"].keys()
        cpu = {p: [statistics.median(x["cpu_" + ph][p] for x in results[k]) for ph in ("first", "rerun")]
               for p in procs}
        print(f"  {NAMES[k]}: " + ", ".join(f"{p} {a:.2f} / {b:.2f}" for p, (a, b) in cpu.items())
              + f"; total {sum(a for a, _ in cpu.values()):.2f} / {sum(b for _, b in cpu.values()):.2f}")
    for k in keys:
        print(f"{NAMES[k]} per round: first " + "/".join(f"{x['first']:.2f}" for x in results[k])
              + " s, re-run " + "/".join(f"{x['rerun']:.2f}" for x in results[k]) + " s")
    if "h" in keys and "t" in keys:
        f1, f2 = ratio(results, "t", "h", "first"), ratio(results, "t", "h", "rerun")
        staged = max(x["staging"] for x in results["h"])
        print(f"\ntargets for (h): first run ≥ 1.5× (t): {f1:.2f}× ({'met' if f1 >= 1.5 else 'NOT met'}); "
              f"re-run ≥ 5× (t): {f2:.2f}× ({'met' if f2 >= 5 else 'NOT met'}); "
              f"staging disk 0: {staged} bytes ({'met' if staged == 0 else 'NOT met'})")


if __name__ == "__main__":
    main()
