#!/usr/bin/env python3
"""A stand-in for the GCE/GKE metadata server on 127.0.0.1: answers the token request of the
default service account (with Metadata-Flavor: Google, as the real one demands) with a fixed fake
token, and counts the requests (printed to stderr on SIGTERM).

Usage: gce_metadata.py <port> <token>
"""

import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, token = int(sys.argv[1]), sys.argv[2]
served = 0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        path = self.path.split("?", 1)[0]
        if path != "/computeMetadata/v1/instance/service-accounts/default/token":
            self.send_error(404)
            return
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(403, "Missing Metadata-Flavor:Google header")
            return
        served += 1
        body = json.dumps({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def stop(*_):
    print(f"gce_metadata: {served} tokens served", file=sys.stderr, flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
