"""A Standard Webhooks receiver for healer/tests/notify.rs.

Verifies every request with PyPI `standardwebhooks` (`Webhook(secret).verify(body, headers)`), answers
401 to one that does not verify, deduplicates by `webhook-id` (a repeat is answered 200 and not
recorded again), and appends each verified, new message to the output file as one JSON line
`{"id": <webhook-id>, "body": <the JSON body>}`, flushed before the answer, so what the file holds was
acknowledged. Requests are handled one at a time in arrival order.

    python3 notify_receiver.py --port P --secret whsec_... --out FILE [--fail-first K] [--delay-ms D]
        [--tls-cert CERT --tls-key KEY]

--tls-cert CERT --tls-key KEY serves https with that certificate. --fail-first K answers 500 to the first K requests (before verifying them); --delay-ms D waits D ms
before answering each request (a slow receiver). A message id seen before a restart is in FILE already:
the ids in FILE are read at start, so deduplication holds across restarts too. Prints `ready` once it
listens, and a line to stderr for every request it does not simply take (failed on purpose, not
verified, a duplicate).
"""

import argparse
import json
import os
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    args = p.parse_args()

    webhook = Webhook(args.secret)
    lock = threading.Lock()
    seen = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            seen.update(json.loads(line)["id"] for line in f if line.strip())
    state = {"requests": 0}
    out = open(args.out, "a")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, text):
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with lock:
                state["requests"] += 1
                n = state["requests"]
                if args.delay_ms:
                    time.sleep(args.delay_ms / 1000)
                msg_id = self.headers.get("webhook-id", "")
                if n <= args.fail_first:
                    print(f"request {n} {msg_id}: 500 (told to fail)", file=sys.stderr, flush=True)
                    return self.answer(500, "failing on purpose")
                try:
                    payload = webhook.verify(body, dict(self.headers.items()))
                except Exception as e:  # any verification failure is the sender's fault
                    print(f"request {n} {msg_id}: 401 {e}", file=sys.stderr, flush=True)
                    return self.answer(401, f"not verified: {e}")
                if msg_id in seen:
                    print(f"request {n} {msg_id}: 200 duplicate", file=sys.stderr, flush=True)
                    return self.answer(200, "duplicate")
                seen.add(msg_id)
                out.write(json.dumps({"id": msg_id, "body": payload}) + "\n")
                out.flush()
                return self.answer(200, "ok")

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
