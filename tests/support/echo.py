#!/usr/bin/env python3
"""Echo backend for the integration tests: answers every HTTP(S) request with JSON describing what
it received (backend name, method, path, headers, peer). Dual-stack.

  echo.py NAME PORT [--tls CERT KEY] [--log FILE] [--status CODE]

`?delay=500ms` delays the answer, `?status=N` sets its status; `--status` sets the default.
"""
import json, socket, ssl, sys, time, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, port = sys.argv[1], int(sys.argv[2])
FIXED_STATUS = int(sys.argv[sys.argv.index("--status") + 1]) if "--status" in sys.argv else 200
log = None
if "--log" in sys.argv:
    log = open(sys.argv[sys.argv.index("--log") + 1], "a", buffering=1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle and delayed ACKs add 40 ms to
    # every keep-alive request.
    disable_nagle_algorithm = True

    def handle_one(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        headers = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = headers[k] + "," + v if k in headers else v
        rec = {"backend": name, "method": self.command, "path": self.path, "headers": headers,
               "peer": self.client_address[0].removeprefix("::ffff:"), "body_len": len(body)}
        if log:
            log.write(json.dumps(rec) + "\n")
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if "delay" in q:
            d = q["delay"][0]
            time.sleep(float(d[:-2]) / 1000 if d.endswith("ms") else float(d.rstrip("s")))
        status = int(q["status"][0]) if "status" in q else FIXED_STATUS
        out = json.dumps(rec).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Backend", name)
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_one

    def log_message(self, *a):
        pass


class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


srv = DualStack(("::", port), Handler)
if "--tls" in sys.argv:
    i = sys.argv.index("--tls")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[i + 1], sys.argv[i + 2])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
