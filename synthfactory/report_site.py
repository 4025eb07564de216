"""Serves the kept reports (a failed gate's report and Great Expectations Data Docs) over
HTTP beside the Prefect UI, so the links in a run's artifacts open from the browser.

Read-only and confined: files under the root only (no listings, no symlinks out), GET and
HEAD only; when the Prefect server requires basic auth, so does this.
"""

from __future__ import annotations

import base64
import hmac
import socket
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote


class _ReportHandler(SimpleHTTPRequestHandler):
    def __init__(self, *args, auth_string: str | None, **kwargs) -> None:
        self.auth_string = auth_string
        super().__init__(*args, **kwargs)

    def _allowed(self) -> bool:
        if self.auth_string is None:
            return True
        expected = "Basic " + base64.b64encode(self.auth_string.encode()).decode()
        if hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected.encode()):
            return True
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Basic realm="synthfactory reports"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def send_head(self):  # type: ignore[no-untyped-def]  # both GET and HEAD come here
        if not self._allowed():
            return None
        path = Path(self.translate_path(self.path))
        root = Path(self.directory).resolve()
        if path.is_dir():
            path = path / "index.html"
        if not path.resolve().is_relative_to(root) or not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "no such report")
            return None
        self.path = "/" + quote(path.resolve().relative_to(root).as_posix())  # the parent unquotes it again
        return super().send_head()

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(HTTPStatus.NOT_FOUND, "no such report")
        return None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  # the UI's server log is enough
        pass


class _IPv6HTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class ReportSite:
    """An HTTP server for `root` on (host, port), in a daemon thread."""

    def __init__(self, root: Path, host: str, port: int, auth_string: str | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        handler = partial(_ReportHandler, directory=str(root), auth_string=auth_string)
        server = _IPv6HTTPServer if ":" in host else ThreadingHTTPServer
        self.httpd = server((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="report-site", daemon=True)

    def start(self) -> "ReportSite":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
