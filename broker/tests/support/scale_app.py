# The autoscaler tests' and benchmark's service: a threading HTTP server. `/work?id=X` takes 200 ms and
# appends X to <logs>/<instance id>.log, so a test can check which instance served which request, and how
# often. COLD_START (seconds, default 0) delays the bind: a service that is slow to start.
import os, sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
port, logs = int(sys.argv[1]), sys.argv[2]
me = os.environ.get("VIGIL_INSTANCE_ID", "unknown")
log = open(os.path.join(logs, me + ".log"), "a", buffering=1)
lock = threading.Lock()
time.sleep(float(os.environ.get("COLD_START", "0")))
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/work"):
            time.sleep(0.2)
            with lock:
                log.write(self.path.split("id=", 1)[-1] + "\n")
        body = me.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 256
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
