"""Shop api: a tiny JSON service (Python standard library only).

Endpoints:
  GET /health  -> 200 "ok"
  GET /items   -> {"version": VERSION, "items": [...]}
  GET /        -> a short JSON description of the service
"""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Edit this line to see a live update: GET /items (and the web page) serve it.
VERSION = "1"

ITEMS = [
    {"id": 1, "name": "teapot", "price_cents": 2400},
    {"id": 2, "name": "mug", "price_cents": 900},
    {"id": 3, "name": "kettle", "price_cents": 3900},
    {"id": 4, "name": "tea towel", "price_cents": 650},
]


class Handler(BaseHTTPRequestHandler):
    server_version = "shop-api/" + VERSION

    def _send(self, status, body, content_type):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status, obj):
        self._send(status, json.dumps(obj) + "\n", "application/json")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, "ok\n", "text/plain; charset=utf-8")
        elif path == "/items":
            self._json(200, {"version": VERSION, "items": ITEMS})
        elif path == "/":
            self._json(200, {
                "service": "api",
                "description": "shop api: lists the items for sale",
                "version": VERSION,
                "endpoints": ["/health", "/items"],
            })
        else:
            self._json(404, {"error": "not found", "path": path})

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        # One line per request, on stdout, flushed at once.
        print("api %s %s" % (self.address_string(), fmt % args), flush=True)


def main():
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    # Stop promptly on `docker stop` (SIGTERM), as PID 1 gets no default handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("api listening on :%d" % port, flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
