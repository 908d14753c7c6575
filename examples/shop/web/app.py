"""Shop web: an HTML front end that calls the api on every page view.

Endpoints:
  GET /                  -> HTML page listing the api's items and its version
  GET /api-version       -> the api's version as plain text
  GET /health            -> 200 "ok"
  GET /static/style.css  -> files under static/
If the api cannot be reached within 2 s, / and /api-version answer 502.
"""

import html
import json
import mimetypes
import os
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_URL = os.environ.get("API_URL", "http://api:8000").rstrip("/")
API_TIMEOUT_S = 2.0
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class ApiError(Exception):
    pass


def fetch_items():
    url = API_URL + "/items"
    try:
        with urllib.request.urlopen(url, timeout=API_TIMEOUT_S) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise ApiError("api at %s answered HTTP %d" % (url, e.code)) from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ApiError("cannot reach the api at %s: %s" % (url, reason)) from e


PAGE = """<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>Shop</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<h1>Shop</h1>
<ul class="items">
{items}
</ul>
<p class="version">api version: <span id="api-version">{version}</span></p>
</body>
</html>
"""


class Handler(BaseHTTPRequestHandler):
    server_version = "shop-web"

    def _send(self, status, body, content_type):
        data = body if isinstance(body, bytes) else body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _bad_gateway(self, err):
        self._send(502, "502 bad gateway: %s\n" % err, "text/plain; charset=utf-8")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, "ok\n", "text/plain; charset=utf-8")
        elif path == "/api-version":
            try:
                data = fetch_items()
            except ApiError as e:
                return self._bad_gateway(e)
            self._send(200, "%s\n" % data.get("version", ""), "text/plain; charset=utf-8")
        elif path == "/":
            try:
                data = fetch_items()
            except ApiError as e:
                return self._bad_gateway(e)
            items = "\n".join(
                '<li><span class="name">%s</span> <span class="price">%d.%02d</span></li>'
                % (html.escape(str(it.get("name", "?"))),
                   it.get("price_cents", 0) // 100, it.get("price_cents", 0) % 100)
                for it in data.get("items", [])
            )
            page = PAGE.format(items=items, version=html.escape(str(data.get("version", ""))))
            self._send(200, page, "text/html; charset=utf-8")
        elif path.startswith("/static/"):
            self._static(path[len("/static/"):])
        else:
            self._send(404, "not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def _static(self, rel):
        full = os.path.realpath(os.path.join(STATIC_DIR, rel))
        root = os.path.realpath(STATIC_DIR)
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            return self._send(404, "not found\n", "text/plain; charset=utf-8")
        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        if ctype.startswith("text/"):
            ctype += "; charset=utf-8"
        with open(full, "rb") as f:
            self._send(200, f.read(), ctype)

    def log_message(self, fmt, *args):
        print("web %s %s" % (self.address_string(), fmt % args), flush=True)


def main():
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    # Stop promptly on `docker stop` (SIGTERM), as PID 1 gets no default handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("web listening on :%d (api at %s)" % (port, API_URL), flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
