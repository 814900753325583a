#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz corpus: valid and nearly valid batches in the harness's
record format ([kind u8][len u16 LE][payload]) and as raw ring bytes ([head u64][frames...])."""
import os, struct, sys
here = os.path.dirname(os.path.abspath(__file__))

def s16(b): return struct.pack('<H', len(b)) + b
def begin(seq, host=b'h', tags=(b't',), meta=((b'k', b'v'),)):
    p = struct.pack('<Q', seq) + (b'\x01' + s16(host) if host is not None else b'\x00')
    p += struct.pack('<H', len(tags)) + b''.join(s16(t) for t in tags)
    p += struct.pack('<H', len(meta)) + b''.join(s16(k) + s16(v) for k, v in meta)
    return (2, p)
def entry(path, kind=1, size=0, known=True, target=b''):
    p = struct.pack('<BBHIIIQqHH', kind, 1 if known else 0, 0, 0o100644, 1000, 1000, size if known else 0,
                    1_700_000_000_000_000_000, len(path), len(target)) + path + target
    return (3, p)
def eom(n): return (4, struct.pack('<Q', n))
def data(b): return (5, b)
def eof(n): return (6, struct.pack('<Q', n))
def commit(e, b): return (7, struct.pack('<QQ', e, b))
def abort(code, r): return (8, struct.pack('<I', code) + s16(r))

batches = {
    'valid': [begin(1), entry(b'a', 2), entry(b'a/b', 1, 5), entry(b'a/c', 3, 0, True, b'../b'), entry(b'd', 1, 0, False),
              eom(4), data(b'hello'), data(b'dump'), eof(4), commit(4, 9)],
    'empty': [begin(2, None, (), ()), eom(0), commit(0, 0)],
    'abort': [begin(3), entry(b'x', 1, 3), eom(1), data(b'x'), abort(1, b'cancelled')],
    'order': [begin(4), entry(b'b'), entry(b'a')],
    'dotdot': [begin(5), entry(b'../etc/passwd')],
    'absolute': [begin(6), entry(b'/etc/passwd')],
    'overrun': [begin(7), entry(b'f', 1, 2), eom(1), data(b'xyz')],
    'torn': [begin(8), entry(b'f', 1, 2), begin(9), eom(0), commit(0, 0)],
    'badeof': [begin(10), entry(b'f', 1, 0, False), eom(1), data(b'ab'), eof(3)],
    'utf8': [begin(11), entry('données/é'.encode()), entry(b'\xff\xfe'), eom(2), commit(2, 0)],
    'unknownkind': [(0, b''), (99, b'xx'), (1, b'')],
}
def records(frames): return b''.join(bytes([k]) + struct.pack('<H', len(p)) + p for k, p in frames)
def ring(frames):
    out = b''
    for k, p in frames:
        out += struct.pack('<IBBH', len(p), k, 1, 0) + p + b'\0' * (-len(p) % 8)
    return struct.pack('<Q', len(out)) + out
for name, frames in batches.items():
    open(os.path.join(here, 'corpus/decode', name), 'wb').write(records(frames))
    open(os.path.join(here, 'corpus/ring', name), 'wb').write(ring(frames)[:4096 + 8])
    # stream: 8 chunk-size bytes (each +1), then the body (the ring's frames without a head).
    for sizes in (bytes([0] * 8), bytes([6, 200, 1, 63, 7, 0, 255, 12])):
        os.makedirs(os.path.join(here, 'corpus/stream'), exist_ok=True)
        open(os.path.join(here, 'corpus/stream', name + '-' + sizes[:2].hex()), 'wb').write(sizes + ring(frames)[8:])
