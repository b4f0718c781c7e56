"""A sample service for Vigil's quick start: an HTTP server holding a configurable amount of touched memory.

GET /healthz answers "ok"; GET / answers the SHA-256 of the memory it holds, so a woken instance proves its
state survived hibernation.
"""
import argparse
import hashlib
import http.server
import os

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--mem-mb", type=int, default=256)
args = parser.parse_args()

STATE = bytearray(os.urandom(args.mem_mb * 1024 * 1024))
DIGEST = hashlib.sha256(STATE).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            body = b"ok\n"
        else:
            body = (hashlib.sha256(STATE).hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
