"""tls.py: option parsing, certificate checks, SNI choice, real handshakes, reload, backend contexts.

Handshakes run over ``socket.socketpair()`` (no ports), the server side in a
thread; the certificates are the committed ones in ``tests/certs`` (no openssl).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import socket_io
import tls
from tests.support import (ROOT, Balancer, RawBackend, admin_call, admin_status, free_port, http_request, read_until_close,
                           wait_admin_port, wait_for)
from tls import CertSpec, CertificateStore, LoadedCert, TLSConfigError

CERTS = Path(__file__).resolve().parent / "certs"
CA = str(CERTS / "ca.pem")
LOCALHOST = CertSpec(str(CERTS / "localhost.pem"))
A = CertSpec(str(CERTS / "a.test.pem"))
B = CertSpec(str(CERTS / "b.test.pem"), str(CERTS / "b.test.key"))
W = CertSpec(str(CERTS / "w.test.pem"))
EXPIRED = CertSpec(str(CERTS / "expired.pem"))
MISMATCHED = CertSpec(str(CERTS / "mismatched.pem"))


@dataclass
class Handshake:
    """What one handshake produced on each side."""

    served: str | None  # the client's view of the certificate's first DNS name
    alpn: str | None
    version: str | None
    server_error: BaseException | None
    client_error: BaseException | None


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str | None) -> Handshake:
    """One TLS handshake over a socketpair; each side's result or error."""
    left, right = socket.socketpair()
    outcome: dict[str, BaseException | None] = {"server": None}

    def serve() -> None:
        try:
            with server.wrap_socket(right, server_side=True) as conn:
                conn.recv(1)  # until the client closes
        except (ssl.SSLError, OSError) as error:
            outcome["server"] = error

    thread = threading.Thread(target=serve)
    thread.start()
    left.settimeout(5)
    served = alpn = version = None
    client_error: BaseException | None = None
    try:
        with client.wrap_socket(left, server_hostname=server_name) as conn:
            cert = conn.getpeercert()
            names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
            served, alpn, version = (names[0] if names else None), conn.selected_alpn_protocol(), conn.version()
    except (ssl.SSLError, OSError) as error:
        client_error = error
    finally:
        left.close()
        thread.join(5)
        right.close()
    return Handshake(served, alpn, version, outcome["server"], client_error)


def verifying_client(check_hostname: bool = False) -> ssl.SSLContext:
    """A client that trusts the test CA (and checks names only if asked)."""
    context = ssl.create_default_context(cafile=CA)
    context.check_hostname = check_hostname
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def fake(name: str, *dns: str) -> LoadedCert:
    """A LoadedCert for the pure matching table (no file, no context)."""
    return LoadedCert(CertSpec(name), tuple(dns), (), 0.0, context=None)  # type: ignore[arg-type]


class ParseOptionTest(unittest.TestCase):
    def test_valid(self) -> None:
        table = [
            ("site.pem", CertSpec("site.pem")),
            ("/etc/cclb/site.pem,key=/etc/cclb/site.key", CertSpec("/etc/cclb/site.pem", "/etc/cclb/site.key")),
            (" site.pem , key = site.key ", CertSpec("site.pem", "site.key")),
        ]
        for text, expected in table:
            with self.subTest(text=text):
                self.assertEqual(tls.parse_cert_option(text), expected)
        self.assertEqual(str(CertSpec("a.pem", "a.key")), "a.pem,key=a.key")

    def test_invalid(self) -> None:
        table = [
            ("", "invalid TLS certificate '': expected PEM or PEM,key=KEYFILE"),
            (",key=x.key", "invalid TLS certificate ',key=x.key': expected PEM or PEM,key=KEYFILE"),
            ("a.pem,password=x", "invalid TLS certificate option 'password=x' in 'a.pem,password=x': expected key=KEYFILE"),
            ("a.pem,key", "invalid TLS certificate option 'key' in 'a.pem,key': expected key=KEYFILE"),
            ("a.pem,key=", "invalid TLS certificate 'a.pem,key=': expected PEM,key=KEYFILE"),
            ("a.pem,key=b.key,key=c.key", "invalid TLS certificate 'a.pem,key=b.key,key=c.key': expected PEM,key=KEYFILE"),
        ]
        for text, message in table:
            with self.subTest(text=text), self.assertRaises(ValueError) as caught:
                tls.parse_cert_option(text)
            self.assertEqual(str(caught.exception), message)

    def test_min_version(self) -> None:
        self.assertEqual(tls.parse_min_version("1.2"), ssl.TLSVersion.TLSv1_2)
        self.assertEqual(tls.parse_min_version("1.3"), ssl.TLSVersion.TLSv1_3)
        with self.assertRaisesRegex(ValueError, r"^invalid TLS version '1.1': expected 1.2 or 1.3$"):
            tls.parse_min_version("1.1")


class LoadCertificateTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_good_certificates(self) -> None:
        table = [(LOCALHOST, ("localhost",), ("127.0.0.1",)), (A, ("a.test",), ()),
                 (B, ("b.test",), ()), (W, ("*.w.test",), ())]
        for spec, dns, ips in table:
            with self.subTest(spec=str(spec)):
                cert = tls.load_certificate(spec)
                self.assertEqual((cert.dns_names, cert.ip_addresses), (dns, ips))
                self.assertGreater(cert.not_after, 2_000_000_000)  # ~20 years of validity
                self.assertIsInstance(cert.context, ssl.SSLContext)

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def test_problems_are_one_line_naming_the_file(self) -> None:
        a_text = Path(A.path).read_text()
        cert_only = self.write("cert-only.pem", a_text.split("-----BEGIN PRIVATE KEY-----")[0])
        key_only = self.write("key-only.pem", Path(B.key_path or "").read_text())
        empty = self.write("empty.pem", "")
        encrypted = self.write("encrypted.pem", a_text.replace("BEGIN PRIVATE KEY", "BEGIN ENCRYPTED PRIVATE KEY"))
        missing = str(self.tmp / "missing.pem")
        table = [
            (CertSpec(missing), f"{missing}: certificate file not found"),
            (CertSpec(str(self.tmp)), f"{self.tmp}: cannot read the certificate file: Is a directory"),
            (CertSpec(A.path, missing), f"{missing}: key file not found"),
            (CertSpec(empty), f"{empty}: no certificate found (expected a PEM 'BEGIN CERTIFICATE' block)"),
            (CertSpec(key_only), f"{key_only}: no certificate found (expected a PEM 'BEGIN CERTIFICATE' block)"),
            (CertSpec(cert_only), f"{cert_only}: no private key found (add it to the file or use PEM,key=KEYFILE)"),
            (CertSpec(A.path, cert_only), f"{cert_only}: no private key found"),
            (CertSpec(encrypted), f"{encrypted}: the private key is encrypted (a key without a passphrase is needed)"),
            (MISMATCHED, f"{MISMATCHED.path}: the private key in {MISMATCHED.path} does not match the certificate"),
            (CertSpec(A.path, B.key_path), f"{A.path}: the private key in {B.key_path} does not match the certificate"),
            (EXPIRED, f"{EXPIRED.path}: the certificate expired on 2021-01-01 00:00:00 UTC"),
        ]
        for spec, message in table:
            with self.subTest(spec=str(spec)), self.assertRaises(TLSConfigError) as caught:
                tls.load_certificate(spec)
            self.assertEqual(str(caught.exception), message)
            self.assertNotIn("\n", message)

    def test_expiry_is_checked_against_now(self) -> None:
        cert = tls.load_certificate(A)
        with self.assertRaisesRegex(TLSConfigError, r"the certificate expired on \d{4}-"):
            tls.load_certificate(A, now=cert.not_after + 1)

    def test_no_certificates(self) -> None:
        with self.assertRaisesRegex(TLSConfigError, "^no TLS certificate given$"):
            tls.load_certificates([])

    def test_decode_needs_the_private_helper(self) -> None:
        real = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
        del ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
        try:
            with self.assertRaisesRegex(TLSConfigError, r"a.test.pem: cannot read certificate details"):
                tls.load_certificate(A)
        finally:
            ssl._ssl._test_decode_cert = real  # type: ignore[attr-defined]


class MatchCertificateTest(unittest.TestCase):
    def test_table(self) -> None:
        first = fake("first", "localhost")
        a, w, both = fake("a", "a.test"), fake("w", "*.w.test"), fake("both", "x.w.test", "b.test")
        certs = [first, a, w, both]
        table = [
            (None, first), ("", first),
            ("a.test", a), ("A.TEST", a), ("a.test.", a),
            ("x.w.test", both),  # exact beats wildcard, even in a later certificate
            ("y.w.test", w), ("Y.W.Test.", w),
            ("w.test", first),  # a wildcard needs one more label
            ("a.b.w.test", first),  # ...exactly one
            ("b.test", both), ("unknown.test", first), ("localhost", first), ("*.w.test", w),
        ]
        for name, expected in table:
            with self.subTest(name=name):
                self.assertIs(tls.match_certificate(name, certs), expected)

    def test_no_certificates(self) -> None:
        with self.assertRaises(ValueError):
            tls.match_certificate("a.test", [])


class ServerContextTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.certs = tls.load_certificates([LOCALHOST, A, B, W])
        cls.context = tls.server_context(cls.certs)

    def test_sni_picks_the_certificate(self) -> None:
        table = [(None, "localhost"), ("a.test", "a.test"), ("B.TEST", "b.test"), ("x.w.test", "*.w.test"),
                 ("a.b.w.test", "localhost"), ("other.test", "localhost"), ("localhost", "localhost")]
        for name, served in table:
            with self.subTest(name=name):
                result = handshake(self.context, verifying_client(), name)
                self.assertIsNone(result.client_error)
                self.assertEqual(result.served, served)

    def test_hostname_checked_by_a_real_client(self) -> None:
        for name in ("a.test", "b.test", "x.w.test", "localhost"):
            with self.subTest(name=name):
                self.assertIsNone(handshake(self.context, verifying_client(True), name).client_error)

    def test_alpn_http11_and_tls12_minimum(self) -> None:
        result = handshake(self.context, verifying_client(), "a.test")
        self.assertEqual(result.alpn, "http/1.1")  # the client offered h2 first
        self.assertIn(result.version, ("TLSv1.2", "TLSv1.3"))
        tls12 = verifying_client()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        self.assertEqual(handshake(self.context, tls12, "a.test").version, "TLSv1.2")

    def test_tls11_refused(self) -> None:
        old = verifying_client()
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client try; the server must say no
        result = handshake(self.context, old, "a.test")
        self.assertIsInstance(result.client_error, ssl.SSLError)
        self.assertIsInstance(result.server_error, ssl.SSLError)
        self.assertIn("UNSUPPORTED_PROTOCOL", str(result.server_error))

    def test_min_13_refuses_12(self) -> None:
        context = tls.server_context(tls.load_certificates([A], ssl.TLSVersion.TLSv1_3), ssl.TLSVersion.TLSv1_3)
        tls12 = verifying_client()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        self.assertIsInstance(handshake(context, tls12, "a.test").client_error, ssl.SSLError)
        self.assertEqual(handshake(context, verifying_client(), "a.test").version, "TLSv1.3")

    def test_safe_options(self) -> None:
        self.assertTrue(self.context.options & ssl.OP_NO_COMPRESSION)
        self.assertTrue(self.context.options & ssl.OP_NO_RENEGOTIATION)
        self.assertEqual(self.context.minimum_version, ssl.TLSVersion.TLSv1_2)
        tls12 = {c["name"] for c in self.context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        self.assertTrue(tls12 <= set(tls.INTERMEDIATE_CIPHERS.split(":")), tls12)
        with self.assertRaises(ValueError):
            tls.server_context([])


class CertificateStoreTest(unittest.TestCase):
    def test_reload_swaps_for_new_connections_and_keeps_old_on_error(self) -> None:
        store = CertificateStore([A])
        context = store.context
        self.assertEqual(handshake(context, verifying_client(), None).served, "a.test")
        for bad, message in [([EXPIRED], "expired on 2021-01-01"), ([MISMATCHED], "does not match"),
                             ([B, CertSpec("/nonexistent.pem")], "/nonexistent.pem: certificate file not found"),
                             ([], "no TLS certificate given")]:
            with self.subTest(bad=[str(s) for s in bad]):
                error = store.reload(bad)
                self.assertIsInstance(error, TLSConfigError)
                self.assertIn(message, str(error))
                self.assertEqual(store.specs, (A,))
                self.assertEqual(handshake(context, verifying_client(), None).served, "a.test")
        self.assertIsNone(store.reload([B, W]))
        self.assertIs(store.context, context)
        self.assertEqual(handshake(context, verifying_client(), None).served, "b.test")
        self.assertEqual(handshake(context, verifying_client(), "q.w.test").served, "*.w.test")
        self.assertIsNone(store.reload())  # same files again
        self.assertEqual([c.spec for c in store.current()], [B, W])

    def test_reload_can_raise_the_minimum_version(self) -> None:
        store = CertificateStore([A])
        tls12 = verifying_client()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        self.assertEqual(handshake(store.context, tls12, "a.test").version, "TLSv1.2")
        self.assertIsNone(store.reload(min_version=ssl.TLSVersion.TLSv1_3))
        self.assertIsInstance(handshake(store.context, tls12, "a.test").client_error, ssl.SSLError)
        self.assertEqual(handshake(store.context, verifying_client(), "a.test").version, "TLSv1.3")

    def test_bad_start(self) -> None:
        with self.assertRaisesRegex(TLSConfigError, r"expired\.pem: the certificate expired"):
            CertificateStore([A, EXPIRED])


class TimeoutsTest(unittest.TestCase):
    def test_tls_socket_reads_time_out(self) -> None:
        # With socket_io's kernel timeouts an SSLSocket read would retry forever.
        server = tls.server_context(tls.load_certificates([LOCALHOST]))
        left, right = socket.socketpair()
        box: dict[str, ssl.SSLSocket] = {}
        thread = threading.Thread(target=lambda: box.setdefault("s", server.wrap_socket(right, server_side=True)))
        thread.start()
        with tls.client_context(CA).wrap_socket(left, server_hostname="localhost") as client:
            thread.join(5)
            with box["s"] as served:
                tls.set_timeouts(served, 0.05)
                self.assertEqual(served.gettimeout(), 0.05)
                with self.assertRaises(TimeoutError):
                    socket_io.SocketReader(served).fill()
                tls.set_timeouts(client, 0.05)
                with self.assertRaises(TimeoutError):
                    client.recv(1)
        plain_a, plain_b = socket.socketpair()
        with plain_a, plain_b:
            tls.set_timeouts(plain_a, 0.05)
            self.assertIsNone(plain_a.gettimeout())  # kernel timeouts, blocking mode
            with self.assertRaises(TimeoutError):
                socket_io.SocketReader(plain_a).fill()


class ClientContextTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.server = tls.server_context(tls.load_certificates([LOCALHOST, A]))

    def test_verifies_against_the_given_ca(self) -> None:
        context = tls.client_context(CA)
        self.assertTrue(context.check_hostname)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        for name, served in [("localhost", "localhost"), ("127.0.0.1", "localhost"), ("a.test", "a.test")]:
            with self.subTest(name=name):
                result = handshake(self.server, context, name)
                self.assertIsNone(result.client_error)
                self.assertEqual((result.served, result.alpn), (served, "http/1.1"))

    def test_wrong_name_fails_clearly(self) -> None:
        result = handshake(self.server, tls.client_context(CA), "b.test")  # gets localhost's certificate
        self.assertIsInstance(result.client_error, ssl.SSLCertVerificationError)
        self.assertIn("certificate verify failed", str(result.client_error))
        self.assertEqual(tls.describe_tls_error(result.client_error),  # type: ignore[arg-type]
                         "certificate verify failed: Hostname mismatch, certificate is not valid for 'b.test'.")

    def test_system_store_does_not_know_the_test_ca(self) -> None:
        result = handshake(self.server, tls.client_context(), "a.test")
        self.assertIsInstance(result.client_error, ssl.SSLCertVerificationError)
        self.assertIn("certificate verify failed", str(result.client_error))

    def test_insecure_skips_verification(self) -> None:
        context = tls.client_context(insecure=True)
        self.assertEqual(context.verify_mode, ssl.CERT_NONE)
        result = handshake(self.server, context, "b.test")
        self.assertIsNone(result.client_error)

    def test_bad_ca_file(self) -> None:
        with self.assertRaisesRegex(TLSConfigError, r"^/nonexistent/ca.pem: CA file not found$"):
            tls.client_context("/nonexistent/ca.pem")
        with self.assertRaisesRegex(TLSConfigError, r"b.test.key: no CA certificate found"):
            tls.client_context(B.key_path)


class TLSListenerTests(unittest.TestCase):
    """cclb.py --tls-cert end to end: real processes, real ``ssl`` clients."""

    def setUp(self) -> None:
        self.backend = RawBackend()
        self.addCleanup(self.backend.stop)
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder, True)

    def start(self, *certs: CertSpec, extra: tuple[str, ...] = ()) -> Balancer:
        args = [arg for cert in certs for arg in ("--tls-cert", str(cert))]
        balancer = Balancer([self.backend.port], "--health-interval", "0", *args, *extra)
        self.addCleanup(balancer.kill)
        return balancer

    def get(self, port: int, server_name: str, path: str = "/") -> tuple[str, bytes, dict]:
        """GET over TLS with SNI ``server_name``: (status line + headers, body, peer certificate)."""
        context = tls.client_context(CA)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as sock:
                peer = sock.getpeercert()
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\n"
                             "Connection: close\r\n\r\n".encode())
                data = read_until_close(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        return head.decode("latin-1"), body, peer

    def test_sni_picks_the_certificate_and_requests_are_forwarded_as_https(self) -> None:
        balancer = self.start(LOCALHOST, A, extra=("--hsts", "600"))
        for name, expected in (("localhost", "localhost"), ("a.test", "a.test")):
            with self.subTest(name=name):
                head, body, peer = self.get(balancer.port, name, f"/sni-{name}")
                self.assertTrue(head.startswith("HTTP/1.1 200"), head)
                self.assertIn(("DNS", expected), peer["subjectAltName"])
                self.assertIn("Strict-Transport-Security: max-age=600", head)
        seen = self.backend.received()
        self.assertIn(b"X-Forwarded-Proto: https\r\n", seen)
        self.assertIn(b"GET /sni-a.test HTTP/1.1\r\n", seen)
        self.assertIn("listening on https://", balancer.log_text() + "".join(balancer.stdout))

    def test_plain_http_on_the_tls_port_is_closed_and_cclb_keeps_serving(self) -> None:
        balancer = self.start(LOCALHOST)
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = read_until_close(sock)
            except ConnectionResetError:
                answer = b""
        self.assertFalse(answer.startswith(b"HTTP/1.1 200"), answer[:100])
        head, _, _ = self.get(balancer.port, "localhost")
        self.assertTrue(head.startswith("HTTP/1.1 200"), head)
        self.assertEqual(balancer.stop(), 0)
        self.assertNotIn("Traceback", balancer.log_text())

    def test_a_stalled_handshake_does_not_hold_its_thread_past_the_header_timeout(self) -> None:
        balancer = self.start(LOCALHOST, extra=("--header-timeout", "0.5"))
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            started = time.monotonic()
            try:
                self.assertEqual(sock.recv(100), b"")
            except ConnectionResetError:
                pass
            self.assertLess(time.monotonic() - started, 5)

    def test_redirect_http_answers_308_to_the_tls_listener(self) -> None:
        redirect_port = free_port()
        balancer = self.start(LOCALHOST, extra=("--redirect-http", str(redirect_port)))
        with socket.create_connection(("127.0.0.1", redirect_port), timeout=10) as sock:
            sock.sendall(b"POST /a/b?c=1 HTTP/1.1\r\nHost: shop.example:8080\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            answer = read_until_close(sock).decode("latin-1")
        self.assertTrue(answer.startswith("HTTP/1.1 308 Permanent Redirect\r\n"), answer)
        self.assertIn(f"Location: https://shop.example:{balancer.port}/a/b?c=1\r\n", answer)

    def test_bad_certificates_exit_2_with_one_line_naming_the_file(self) -> None:
        for spec, problem in ((EXPIRED, "expired"), (MISMATCHED, "does not match"),
                              (CertSpec("/nonexistent/x.pem"), "not found")):
            for check in ((), ("--check",)):
                with self.subTest(spec=spec.path, check=check):
                    result = subprocess.run(
                        [sys.executable, str(ROOT / "cclb.py"), "-p", "0", "--tls-cert", str(spec),
                         *check], capture_output=True, text=True, timeout=20)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    lines = result.stderr.strip().splitlines()
                    self.assertEqual(len(lines), 1, lines)
                    self.assertIn(spec.path, lines[0])
                    self.assertIn(problem, lines[0])

    def test_sighup_rereads_certificates_and_keeps_the_old_ones_when_the_new_are_bad(self) -> None:
        path = str(Path(self.folder) / "site.pem")
        shutil.copy(A.path, path)
        balancer = self.start(CertSpec(path))
        _, _, peer = self.get(balancer.port, "a.test")
        self.assertIn(("DNS", "a.test"), peer["subjectAltName"])
        shutil.copy(LOCALHOST.path, path + ".new")
        os.replace(path + ".new", path)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in balancer.log_text(), 5, message="the reload")
        _, _, peer = self.get(balancer.port, "localhost")
        self.assertIn(("DNS", "localhost"), peer["subjectAltName"])
        shutil.copy(EXPIRED.path, path + ".new")
        os.replace(path + ".new", path)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "keeping the current TLS certificates" in balancer.log_text(), 5,
                 message="the refused reload")
        _, _, peer = self.get(balancer.port, "localhost")
        self.assertIn(("DNS", "localhost"), peer["subjectAltName"])
        self.assertEqual(balancer.stop(), 0)


class _TLSBackendHandler(BaseHTTPRequestHandler):
    """Answers every GET with its path; keep-alive (HTTP/1.1 with Content-Length)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall
    server: TLSBackend

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"tls backend saw {self.path}".encode()
        self.server.record(self.request.number, self.path)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class TLSBackend(ThreadingHTTPServer):
    """An in-process HTTPS backend on 127.0.0.1 serving ``cert``, counting TCP connections.

    The handshake runs in the connection's thread (not in the accept loop),
    so a client that rejects the certificate holds nothing up.  ``lock``
    guards ``connections`` (accepted TCP connections) and ``seen``
    ((connection number, path) of every request, in order).
    """

    daemon_threads = True
    block_on_close = True

    def __init__(self, cert: CertSpec) -> None:
        super().__init__(("127.0.0.1", 0), _TLSBackendHandler)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert.path, cert.key_path)
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.connections = 0
        self.seen: list[tuple[int, str]] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="tls-backend", daemon=True)
        self.thread.start()

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        with self.lock:
            self.connections += 1
            number = self.connections
        request.settimeout(10)
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except OSError:  # the client refused the certificate, or went away
            return
        with conn:
            conn.number = number  # type: ignore[attr-defined]
            try:
                self.RequestHandlerClass(conn, client_address, self)
            except OSError:
                pass

    def record(self, number: int, path: str) -> None:
        with self.lock:
            self.seen.append((number, path))

    def connections_for(self, prefix: str) -> set[int]:
        """The connections that carried a request whose path starts with ``prefix``."""
        with self.lock:
            return {number for number, path in self.seen if path.startswith(prefix)}

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class HTTPSBackendTests(unittest.TestCase):
    """Issue 9: ``--backend https://...`` behind a real cclb.py, verified with SNI and name checks."""

    def backend(self, cert: CertSpec = LOCALHOST) -> TLSBackend:
        backend = TLSBackend(cert)
        self.addCleanup(backend.stop)
        return backend

    def balancer(self, url: str, *extra: str) -> tuple[Balancer, int]:
        """cclb in front of ``url`` with fast health checks; (balancer, admin port)."""
        balancer = Balancer([url], "--health-interval", "0.2", "--health-path", "/health",
                            "--admin-port", "0", *extra)
        self.addCleanup(balancer.kill)
        return balancer, wait_admin_port(balancer)

    def row(self, balancer: Balancer, admin_port: int) -> dict:
        return admin_status(self, balancer, admin_port)["backends"][0]

    def wait_check(self, balancer: Balancer, admin_port: int, needle: str) -> dict:
        """The /status row once its ``last_check`` mentions ``needle``."""
        def check() -> dict | None:
            row = self.row(balancer, admin_port)
            return row if needle in row["last_check"] else None

        return wait_for(check, 10, message=f"a health check saying {needle!r}")  # type: ignore[return-value]

    def test_verified_requests_are_forwarded_over_reused_tls_connections(self) -> None:
        backend = self.backend()
        url = f"https://localhost:{backend.port}"
        balancer, admin_port = self.balancer(url, "--backend-ca", CA)
        row = self.wait_check(balancer, admin_port, "HTTP 200")
        self.assertEqual((row["url"], row["state"]), (url, "up"))
        client = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=10)
        self.addCleanup(client.close)
        for number in range(6):
            client.request("GET", f"/item/{number}")
            response = client.getresponse()
            self.assertEqual((response.status, response.read()), (200, f"tls backend saw /item/{number}".encode()))
        used = backend.connections_for("/item/")
        self.assertLess(len(used), 6, f"no backend connection was reused: {used}")
        self.assertEqual(len(used), 1)  # one keep-alive client: its own pooled connection every time
        self.assertTrue(backend.connections_for("/health"))  # health checks go over TLS too
        self.assertNotIn("insecure", balancer.log_text())
        self.assertEqual(balancer.stop(), 0)
        self.assertNotIn("Traceback", balancer.log_text())

    def test_the_system_store_rejects_the_test_ca_and_the_backend_is_down(self) -> None:
        backend = self.backend()
        balancer, admin_port = self.balancer(f"https://localhost:{backend.port}")
        row = self.wait_check(balancer, admin_port, "certificate verify failed")
        self.assertEqual(row["state"], "down")
        status, _, _ = http_request(balancer.port, "GET", "/x", timeout=10)
        self.assertIn(status, (502, 503))
        self.assertEqual(backend.connections_for("/"), set())  # nothing was ever sent
        wait_for(lambda: "certificate verify failed" in balancer.log_text(), 5, message="the DOWN line")
        self.assertNotIn("Traceback", balancer.log_text())

    def test_a_name_mismatch_fails_clearly(self) -> None:
        backend = self.backend(A)  # a.test's certificate, reached as 127.0.0.1
        balancer, admin_port = self.balancer(f"https://127.0.0.1:{backend.port}", "--backend-ca", CA)
        row = self.wait_check(balancer, admin_port, "certificate verify failed")
        self.assertIn("mismatch", row["last_check"])
        self.assertIn("127.0.0.1", row["last_check"])
        self.assertEqual(row["state"], "down")
        status, _, _ = http_request(balancer.port, "GET", "/x", timeout=10)
        self.assertIn(status, (502, 503))
        self.assertEqual(backend.connections_for("/"), set())
        self.assertNotIn("Traceback", balancer.log_text())

    def test_a_host_that_resolves_nowhere_fails_clearly(self) -> None:
        balancer, admin_port = self.balancer(f"https://a.test:{free_port()}", "--backend-ca", CA)
        row = self.wait_check(balancer, admin_port, "cannot resolve host")
        self.assertEqual(row["state"], "down")
        status, _, _ = http_request(balancer.port, "GET", "/x", timeout=10)
        self.assertIn(status, (502, 503))
        self.assertNotIn("Traceback", balancer.log_text())

    def test_backend_insecure_skips_verification_and_warns(self) -> None:
        backend = self.backend(A)  # wrong name and unknown CA: accepted all the same
        balancer, admin_port = self.balancer(f"https://127.0.0.1:{backend.port}", "--backend-insecure")
        self.wait_check(balancer, admin_port, "HTTP 200")
        status, _, body = http_request(balancer.port, "GET", "/anyway", timeout=10)
        self.assertEqual((status, body), (200, b"tls backend saw /anyway"))
        warning = [line for line in balancer.log_text().splitlines() if "--backend-insecure" in line]
        self.assertEqual(len(warning), 1, balancer.log_text())
        self.assertIn("WARNING", warning[0])
        self.assertIn("NOT verified", warning[0])

    def test_an_https_backend_added_with_the_admin_api_uses_the_same_tls_settings(self) -> None:
        backend = self.backend()
        url = f"https://localhost:{backend.port}"
        balancer, admin_port = self.balancer(f"http://127.0.0.1:{free_port()}", "--backend-ca", CA)
        status, _, body = admin_call(self, balancer, admin_port, "POST", "/backends",
                                     json.dumps({"url": url}).encode(), {"Content-Type": "application/json"})
        self.assertEqual(status, 201, body)

        def added_and_up() -> bool:
            rows = admin_status(self, balancer, admin_port)["backends"]
            return any(row["url"] == url and row["last_check"] == "HTTP 200" for row in rows)
        wait_for(added_and_up, 10, message="the added https backend to pass its check")
        for _ in range(3):  # the dead http backend is down: every request goes over TLS
            status, _, body = http_request(balancer.port, "GET", "/added", timeout=10)
            self.assertEqual((status, body), (200, b"tls backend saw /added"))

    def test_a_bad_backend_ca_exits_2_with_one_line_naming_the_file(self) -> None:
        for path, problem in (("/nonexistent/ca.pem", "not found"), (str(B.key_path), "no CA certificate")):
            for check in ((), ("--check",)):
                with self.subTest(path=path, check=check):
                    result = subprocess.run(
                        [sys.executable, str(ROOT / "cclb.py"), "-p", "0", "-b", "https://localhost:1",
                         "--backend-ca", path, *check], capture_output=True, text=True, timeout=20)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    lines = result.stderr.strip().splitlines()
                    self.assertEqual(len(lines), 1, lines)
                    self.assertIn(path, lines[0])
                    self.assertIn(problem, lines[0])


if __name__ == "__main__":
    unittest.main()
