#!/usr/bin/env python3
"""An HTTP CONNECT proxy on 127.0.0.1 that tunnels every CONNECT to one local port, whatever host
the client named. restic 0.14's gs: backend has no endpoint setting (it always dials
storage.googleapis.com:443) but honours HTTPS_PROXY: through this proxy it reaches the emulator's
TLS port here, and `restic --cacert` trusts the test CA that signed the emulator's certificate.
Nothing leaves the machine: the only address this proxy ever connects to is 127.0.0.1:<target>.

Usage: connect_to.py <listen port> <target port>   (prints the CONNECT count on SIGTERM to stderr)
"""

import signal
import socket
import sys
import threading

listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
tunnels = 0


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def handle(client):
    global tunnels
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(4096)
        if not chunk or len(head) > 16384:
            client.close()
            return
        head += chunk
    if not head.startswith(b"CONNECT "):
        client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        client.close()
        return
    upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
    upstream.settimeout(None)
    tunnels += 1
    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    rest = head.split(b"\r\n\r\n", 1)[1]
    if rest:
        upstream.sendall(rest)
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
    pump(client, upstream)


def stop(*_):
    print(f"connect_to: {tunnels} tunnels", file=sys.stderr, flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen(64)
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
