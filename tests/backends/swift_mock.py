#!/usr/bin/env python3
"""A small OpenStack Swift + Keystone stand-in for the backends suite (no Swift server runs here).

Serves, on 127.0.0.1:<port>, in memory:
  POST /v3/auth/tokens   Keystone v3 password auth for user `ci` / `ci-pass`, project `backups`
                         (domain Default); answers X-Subject-Token and a catalog whose public
                         object-store endpoint is this server. Tokens say they expire in 301 s, but
                         are refused after TOKEN_LIFE seconds: a client that does not renew 5 min
                         before the stated expiry fails.
  GET  /auth/v1.0        v1 auth (X-Auth-User `ci:ci`, X-Auth-Key `ci-key`).
  /v1/AUTH_ci/<container>[/<object>]  HEAD/GET (Range)/PUT/DELETE objects, container listings
                         (prefix, delimiter, marker, limit, format=json), every call token-checked.
Writes {"auth": n, "refused": n} to the file named by SWIFT_MOCK_STATS on SIGTERM.
Usage: swift_mock.py <port>
"""
import hashlib, json, os, signal, sys, threading, time
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN_LIFE = 4.0
port = int(sys.argv[1])
lock = threading.Lock()
tokens = {}  # token -> issued at
objects = {}  # (container, name) -> (bytes, mtime)
stats = {"auth": 0, "refused": 0}


def issue():
    with lock:
        stats["auth"] += 1
        tok = f"tok-{stats['auth']}-{os.urandom(4).hex()}"
        tokens[tok] = time.monotonic()
    return tok


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def authorized(self):
        issued = tokens.get(self.headers.get("X-Auth-Token", ""))
        if issued is None or time.monotonic() - issued > TOKEN_LIFE:
            with lock:
                stats["refused"] += 1
            self.reply(401, b"token expired or unknown")
            return False
        return True

    def do_POST(self):
        u = urlparse(self.path)
        if u.path != "/v3/auth/tokens":
            return self.reply(404)
        req = json.loads(self.body())
        ident = req["auth"]["identity"]
        user = ident.get("password", {}).get("user", {})
        scope = req["auth"].get("scope", {}).get("project", {})
        if (ident.get("methods") != ["password"] or user.get("name") != "ci" or user.get("password") != "ci-pass"
                or user.get("domain") != {"name": "Default"} or scope.get("name") != "backups"):
            return self.reply(401, b'{"error": {"code": 401, "title": "Unauthorized"}}')
        expires = (datetime.now(timezone.utc) + timedelta(seconds=301)).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        catalog = [{"type": "identity", "endpoints": []},
                   {"type": "object-store", "endpoints": [
                       {"interface": "internal", "region": "RegionOne", "url": "http://10.255.255.1/v1/AUTH_ci"},
                       {"interface": "public", "region": "RegionOne", "url": f"http://127.0.0.1:{port}/v1/AUTH_ci"}]}]
        body = json.dumps({"token": {"expires_at": expires, "catalog": catalog}}).encode()
        self.reply(201, body, [("X-Subject-Token", issue()), ("Content-Type", "application/json")])

    def split(self):
        u = urlparse(self.path)
        parts = u.path.split("/", 4)  # '', 'v1', 'AUTH_ci', container, object
        if len(parts) < 4 or parts[1] != "v1" or parts[2] != "AUTH_ci":
            return None, None, None
        return unquote(parts[3]), unquote(parts[4]) if len(parts) > 4 else "", parse_qs(u.query)

    def do_GET(self):
        if urlparse(self.path).path == "/auth/v1.0":
            if self.headers.get("X-Auth-User") != "ci:ci" or self.headers.get("X-Auth-Key") != "ci-key":
                return self.reply(401)
            return self.reply(200, headers=[("X-Storage-Url", f"http://127.0.0.1:{port}/v1/AUTH_ci"),
                                            ("X-Auth-Token", issue()), ("X-Auth-Token-Expires", "301")])
        c, name, q = self.split()
        if c is None:
            return self.reply(404)
        if not self.authorized():
            return
        if name == "":
            return self.listing(c, q)
        self.get_object(c, name)

    def do_HEAD(self):
        c, name, _ = self.split()
        if c is None or not self.authorized():
            return c is None and self.reply(404)
        self.get_object(c, name)

    def get_object(self, c, name):
        with lock:
            obj = objects.get((c, name))
        if obj is None:
            return self.reply(404)
        data, mtime = obj
        meta = [("ETag", hashlib.md5(data).hexdigest()), ("Last-Modified", formatdate(mtime, usegmt=True)),
                ("Content-Type", "application/octet-stream")]
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            a, b = rng.removeprefix("bytes=").split("-")
            a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            return self.reply(206, data[a:b + 1], meta + [("Content-Range", f"bytes {a}-{b}/{len(data)}")])
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in meta:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self.reply(200, data, meta)

    def listing(self, c, q):
        prefix = q.get("prefix", [""])[0]
        delim = q.get("delimiter", [""])[0]
        marker = q.get("marker", [""])[0]
        limit = int(q.get("limit", ["10000"])[0])
        with lock:
            names = sorted(n for (cc, n) in objects if cc == c and n.startswith(prefix))
        out, seen = [], set()
        for n in names:
            rest = n[len(prefix):]
            if delim and delim in rest:
                sub = prefix + rest[:rest.index(delim) + 1]
                if sub > marker and sub not in seen:
                    seen.add(sub)
                    out.append({"subdir": sub})
            elif n > marker:
                data, mtime = objects[(c, n)]
                out.append({"name": n, "bytes": len(data), "hash": hashlib.md5(data).hexdigest(),
                            "last_modified": datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f"),
                            "content_type": "application/octet-stream"})
            if len(out) >= limit:
                break
        self.reply(200, json.dumps(out).encode(), [("Content-Type", "application/json")])

    def do_PUT(self):
        c, name, _ = self.split()
        if c is None:
            return self.reply(404)
        data = self.body()
        if not self.authorized():
            return
        with lock:
            objects[(c, name)] = (data, time.time())
        self.reply(201, headers=[("ETag", hashlib.md5(data).hexdigest())])

    def do_DELETE(self):
        c, name, _ = self.split()
        if c is None or not self.authorized():
            return c is None and self.reply(404)
        with lock:
            found = objects.pop((c, name), None)
        self.reply(204 if found else 404)


server = ThreadingHTTPServer(("127.0.0.1", port), H)


def stop(*_):
    path = os.environ.get("SWIFT_MOCK_STATS")
    if path:
        with open(path, "w") as f:
            json.dump(stats, f)
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, stop)
server.serve_forever()
