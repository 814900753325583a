#!/usr/bin/env python3
"""A fault-injecting HTTP proxy for the S3 suite of .ci/run (stdlib only).

    fault_proxy.py LISTEN_PORT UPSTREAM_PORT [--every N]

Forwards every request to 127.0.0.1:UPSTREAM_PORT unchanged (the Host header too, so SigV4
signatures stay valid) and, by a fixed schedule over the request count, answers some requests
itself instead: 503 SlowDown, 500 InternalError, or a dropped connection (after forwarding, so the
server applied a request whose answer the client never sees). Counts go to stderr at exit and to
the file named by FAULT_PROXY_STATS if set.
"""

import http.client
import http.server
import json
import os
import signal
import sys
import threading

LISTEN, UPSTREAM = int(sys.argv[1]), int(sys.argv[2])
EVERY = int(sys.argv[sys.argv.index("--every") + 1]) if "--every" in sys.argv else 5
lock = threading.Lock()
stats = {"requests": 0, "slowdown": 0, "internal": 0, "dropped": 0}

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate. (injected)</Message></Error>')
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b'<Message>We encountered an internal error. (injected)</Message></Error>')


def fault_for(n):
    """The schedule: of every 3*EVERY requests, one of each fault."""
    k = n % (3 * EVERY)
    return {EVERY - 1: "slowdown", 2 * EVERY - 1: "internal", 3 * EVERY - 1: "dropped"}.get(k)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self):
        body = self.body()
        with lock:
            stats["requests"] += 1
            fault = fault_for(stats["requests"])
            if fault:
                stats[fault] += 1
        if fault == "slowdown":
            return self.answer(503, SLOWDOWN)
        if fault == "internal":
            return self.answer(500, INTERNAL)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            headers["Content-Length"] = str(len(body))
        up = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=120)
        up.request(self.command, self.path, body=body, headers=headers)
        resp = up.getresponse()
        data = resp.read()
        if fault == "dropped":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        up.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


def report(*_):
    print(f"fault proxy: {json.dumps(stats)}", file=sys.stderr, flush=True)
    if os.environ.get("FAULT_PROXY_STATS"):
        with open(os.environ["FAULT_PROXY_STATS"], "w") as f:
            json.dump(stats, f)
    os._exit(0)


signal.signal(signal.SIGTERM, report)
server = http.server.ThreadingHTTPServer(("127.0.0.1", LISTEN), Handler)
server.daemon_threads = True
print(f"fault proxy on 127.0.0.1:{LISTEN} -> 127.0.0.1:{UPSTREAM}, a fault every {EVERY} requests", flush=True)
server.serve_forever()
