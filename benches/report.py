#!/usr/bin/env python3
"""Prints the BENCHMARKS.md tables from criterion's results of `cargo bench --bench ring`.

Reads target/criterion/<group>/<function>/<param>/new/{estimates,benchmark}.json. Every figure comes
from the same run, so ratios (ring vs memcpy, ring vs pipe) are what to compare; absolute GB/s drift
on a shared machine.
"""
import json, os, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'target', 'criterion')
res = {}
for dirpath, _, files in os.walk(root):
    if os.path.basename(dirpath) == 'new' and 'estimates.json' in files:
        est = json.load(open(os.path.join(dirpath, 'estimates.json')))
        bench = json.load(open(os.path.join(dirpath, 'benchmark.json')))
        ns = est['median']['point_estimate']
        tp = (bench.get('throughput') or {}).get('Bytes')
        res[bench['full_id']] = (ns, tp)
if not res:
    sys.exit('no criterion results under target/criterion: run `cargo bench -p shmback-benches --bench ring` first')

def gbps(key):
    ns, tp = res.get(key, (None, None))
    return tp / ns if ns and tp else None

frames = ['4KiB', '64KiB', '1MiB']
rings = ['1MiB', '4MiB', '16MiB', '64MiB']
f = lambda v: '—' if v is None else f'{v:.2f}'
print('Throughput, GB/s (median of 10 samples); ratios against memcpy and pipe of the same frame size, same run\n')
print('| frame | memcpy | pipe | socketpair | ' + ' | '.join(f'ring {r} (proc)' for r in rings) + ' | ring 4MiB (thread) | ring 4MiB ÷ memcpy | ring 4MiB ÷ pipe |')
print('|---' * (7 + len(rings)) + '|')
for fr in frames:
    m, p, s = gbps(f'baseline/memcpy/{fr}'), gbps(f'baseline/pipe/{fr}'), gbps(f'baseline/socketpair/{fr}')
    rs = [gbps(f'ring_process/{fr}/{r}') for r in rings]
    t = gbps(f'ring_thread/{fr}/4MiB')
    r4 = rs[1]
    print(f'| {fr} | {f(m)} | {f(p)} | {f(s)} | ' + ' | '.join(f(x) for x in rs) + f' | {f(t)} | '
          + (f'{r4 / m:.2f}×' if r4 and m else '—') + ' | ' + (f'{r4 / p:.1f}×' if r4 and p else '—') + ' |')
lat = res.get('latency/roundtrip')
if lat:
    print(f'\nWake-up round trip between two processes (frame out, ack back, both sides idle): {lat[0] / 1000:.1f} µs median')

# Producer-side handoff (benches/writer.rs), if it was run.
w, cp = res.get('handoff/writer_ring'), res.get('handoff/cp_a_to_dev_shm')
mem_file = os.path.join(root, 'handoff-memory.json')
if w and cp:
    mem = json.load(open(mem_file)) if os.path.exists(mem_file) else {}
    mib = lambda b: f'{b / 2**20:.1f} MiB' if b is not None else '—'
    print('\nHandoff of one directory tree (same corpus, same run)\n')
    print('| handoff | GB/s | time per tree | peak /dev/shm bytes |')
    print('|---|---|---|---|')
    print(f'| shmback-writer → 4 MiB ring → draining consumer process | {w[1] / w[0]:.2f} | {w[0] / 1e9:.3f} s | {mib(mem.get("ring_segment_bytes"))} (the segment) |')
    print(f'| cp -a into /dev/shm | {cp[1] / cp[0]:.2f} | {cp[0] / 1e9:.3f} s | {mib(mem.get("cp_a_outbox_bytes"))} (a full copy) |')
    print(f'\nwriter ÷ cp -a throughput: {cp[0] / w[0]:.2f}×; corpus {mib(mem.get("corpus_bytes"))}')
