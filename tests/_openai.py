"""A local OpenAI-compatible endpoint for tests: every POST goes to ``reply``; its base URL is yielded."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: (path, headers, JSON body) -> (HTTP status, response bytes)
Reply = Callable[[str, dict[str, str], dict[str, Any]], tuple[int, bytes]]


@contextmanager
def openai_endpoint(reply: Reply) -> Iterator[str]:
    """Serve ``reply`` on 127.0.0.1 (a free port) while active; yields ``http://127.0.0.1:PORT/v1``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, data = reply(self.path, dict(self.headers), body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
