"""``--redirect-http PORT``: a plain-HTTP listener that sends every request to HTTPS.

Every request, whatever its method, gets ``308 Permanent Redirect`` (RFC 9110
15.4.9: the method and body are kept when the client follows it) to
``https://<host><target>``: the host from the request's ``Host`` without its
port, plus ``:<port>`` of the TLS listener unless that is 443.  The decision
is the pure function ``https_location``; the listener is a small
``ThreadingHTTPServer`` with a socket timeout, so an idle or slow client
cannot hold a thread for long.
"""

from __future__ import annotations

import logging
import re
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any

log = logging.getLogger("cclb")

# RFC 9110 7.2 / RFC 3986 3.2.2: host = IP-literal / IPv4address / reg-name, then [":" port].
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]*)?")
_TARGET = re.compile(r"/[\x21-\x7e]*")


def https_location(host_header: str | None, target: str, tls_port: int) -> str | None:
    """Where a plain-HTTP request for ``target`` at ``host_header`` should go; None if unusable.

    The target is kept as sent (path and query); an absolute-form target
    (RFC 9112 3.2.2) contributes its path and query and its authority
    replaces Host.
    """
    if target.lower().startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        authority, slash, path = rest.partition("/")
        host_header, target = authority, "/" + path if slash else "/"
    if host_header is None or not _TARGET.fullmatch(target):
        return None
    match = _HOST.fullmatch(host_header.strip())
    if match is None:
        return None
    host = match[1]
    port = "" if tls_port == 443 else f":{tls_port}"
    return f"https://{host}{port}{target}"


class RedirectHandler(BaseHTTPRequestHandler):
    """Answers every request with a 308 to the HTTPS listener."""

    protocol_version = "HTTP/1.1"
    server_version = "cclb"
    sys_version = ""
    server: RedirectServer
    timeout = 10.0  # seconds a client may stay silent (socketserver applies it to the socket)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(8193)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > 8192:
                self.send_error(414)
                return
            if not self.parse_request():
                return
            self.redirect()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def redirect(self) -> None:
        location = https_location(self.headers.get("Host"), self.path, self.server.tls_port)
        if location is None:
            self.send_error(400, "a valid Host and origin-form target are needed")
            return
        has_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if has_body:
            self.close_connection = True  # the body is not read: the stream cannot go on
        self.send_response(308)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("redirect: " + format, *args)


class RedirectServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], tls_port: int) -> None:
        self.tls_port = tls_port
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RedirectHandler)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # no getfqdn() DNS lookup
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("redirect listener: error while serving %s", client_address[0], exc_info=True)
