"""TLS set-up for cclb: certificates, SNI selection, server and client contexts.

No sockets here: this module turns ``--tls-cert`` options into checked
certificates and ``ssl.SSLContext`` objects; the listener wraps accepted
sockets with ``CertificateStore.context`` and the upstream pool wraps backend
sockets with ``client_context(...)``.

Safe defaults (Mozilla "intermediate" profile, server side):

- TLS 1.2 minimum (``min_version`` may raise it to 1.3); SSLv3, TLS 1.0 and
  1.1 are refused (RFC 8996 deprecates them).
- The intermediate cipher list for TLS 1.2 (ECDHE with AES-GCM or
  ChaCha20-Poly1305 only); TLS 1.3 suites are OpenSSL's defaults, which are
  exactly Mozilla's (RFC 8446 9.1).
- ALPN offers ``http/1.1`` only (RFC 7301): cclb speaks no HTTP/2.
- No TLS compression (CRIME) and no renegotiation (RFC 5746 attacks; TLS 1.3
  removed renegotiation altogether, RFC 8446 4.1.2).

Why a ``CertificateStore``: SIGHUP re-reads the certificates, and the
listener's SSLContext must not change under it.  The store owns one front
context for its whole life; its ``sni_callback`` picks, per handshake, a
per-certificate context from the *current* set (RFC 6066 section 3), so a
reload swaps the set under ``CertificateStore.lock`` and new connections
get the new certificates while established ones keep theirs.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, cast

# Mozilla server-side TLS guidelines, "intermediate" configuration (v5.7), TLS 1.2 suites.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])
ALPN_PROTOCOLS = ["http/1.1"]
MIN_VERSIONS: dict[str, ssl.TLSVersion] = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(Exception):
    """A certificate or TLS option cannot be used; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class CertSpec:
    """One ``--tls-cert`` value: a PEM file with the chain (and the key, unless ``key_path``)."""

    path: str
    key_path: str | None = None

    def __str__(self) -> str:
        return self.path if self.key_path is None else f"{self.path},key={self.key_path}"


@dataclass(frozen=True)
class LoadedCert:
    """A certificate that loaded and checked: its names, expiry and ready server context.

    ``dns_names`` are the subjectAltName DNS entries, lower case, in file order
    (wildcards kept as ``*.example.com``); ``ip_addresses`` the IP entries.
    ``context`` serves this certificate (built by ``load_certificate`` with
    its ``min_version``); ``server_context`` switches handshakes to it.
    """

    spec: CertSpec
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: float  # seconds since the epoch (UTC)
    context: ssl.SSLContext = field(repr=False, compare=False)

    @property
    def expires(self) -> str:
        """``notAfter`` as ``YYYY-MM-DD HH:MM:SS UTC``."""
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.not_after))


def parse_cert_option(text: str) -> CertSpec:
    """``PEM`` or ``PEM,key=KEYFILE`` → ``CertSpec``; ValueError with a message naming the problem.

    Only the syntax is checked here; the files are read by ``load_certificate``.
    """
    path, comma, rest = text.partition(",")
    path = path.strip()
    if not path:
        raise ValueError(f"invalid TLS certificate {text!r}: expected PEM or PEM,key=KEYFILE")
    if not comma:
        return CertSpec(path)
    name, equals, key_path = rest.partition("=")
    if name.strip() != "key" or not equals:
        raise ValueError(f"invalid TLS certificate option {rest!r} in {text!r}: expected key=KEYFILE")
    key_path = key_path.strip()
    if not key_path or "," in key_path:
        raise ValueError(f"invalid TLS certificate {text!r}: expected PEM,key=KEYFILE")
    return CertSpec(path, key_path)


def parse_min_version(text: str) -> ssl.TLSVersion:
    """``1.2`` or ``1.3`` (``--tls-min-version``) → ``ssl.TLSVersion``; ValueError otherwise."""
    try:
        return MIN_VERSIONS[text.strip()]
    except KeyError:
        raise ValueError(f"invalid TLS version {text!r}: expected 1.2 or 1.3") from None


def decode_certificate(path: str) -> dict[str, object]:
    """The first certificate of a PEM file as ``ssl.SSLSocket.getpeercert()`` would show it.

    The standard library has no public X.509 parser, and reading a
    certificate's names and expiry must not need a third-party package, so
    this wraps CPython's private ``ssl._ssl._test_decode_cert`` (present in
    3.11-3.13, used by CPython's own tests).  It is the only private API this
    module touches; if it disappears, loading fails with a clear error rather
    than serving certificates that were never checked.
    """
    decode: Callable[[str], dict[str, object]] | None = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        raise TLSConfigError(f"{path}: cannot read certificate details: this Python has no "
                             "ssl._ssl._test_decode_cert (CPython 3.11-3.13 needed)")
    try:
        return decode(path)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise TLSConfigError(f"{path}: cannot decode the certificate: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    """A short text for an ssl/OS error, without the C source position."""
    if isinstance(error, OSError) and error.strerror and not isinstance(error, ssl.SSLError):
        return error.strerror
    text = getattr(error, "reason", None) or str(error)
    return str(text).split(" (_ssl.c")[0]


def _read_pem(path: str, what: str) -> str:
    """The text of a PEM file; TLSConfigError for a missing or unreadable one."""
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise TLSConfigError(f"{path}: {what} file not found") from None
    except OSError as error:
        raise TLSConfigError(f"{path}: cannot read the {what} file: {error.strerror or error}") from None


def _new_server_context(min_version: ssl.TLSVersion) -> ssl.SSLContext:
    """A server context with the safe defaults and no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min_version
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    # OP_NO_COMPRESSION: CRIME; OP_NO_RENEGOTIATION: client-initiated renegotiation
    # is a DoS lever and TLS 1.3 has none (RFC 8446 4.1.2). Server cipher preference
    # stays off, as Mozilla's intermediate profile says (every listed suite is strong).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def load_certificate(spec: CertSpec, min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                     now: float | None = None) -> LoadedCert:
    """Read and check one certificate (and key): every problem is a one-line TLSConfigError.

    Checked, in order: the files exist and are readable, the PEM has a
    certificate and a (not encrypted) private key, the key fits the
    certificate (``load_cert_chain``), and the certificate has not expired
    at ``now`` (default: the current time).  The message starts with the
    file it is about.
    """
    text = _read_pem(spec.path, "certificate")
    key_text = text if spec.key_path is None else _read_pem(spec.key_path, "key")
    key_file = spec.key_path or spec.path
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise TLSConfigError(f"{spec.path}: no certificate found (expected a PEM 'BEGIN CERTIFICATE' block)")
    if "PRIVATE KEY-----" not in key_text:
        hint = "" if spec.key_path else " (add it to the file or use PEM,key=KEYFILE)"
        raise TLSConfigError(f"{key_file}: no private key found{hint}")
    if "ENCRYPTED" in key_text:
        raise TLSConfigError(f"{key_file}: the private key is encrypted (a key without a passphrase is needed)")
    details = decode_certificate(spec.path)
    context = _new_server_context(min_version)
    try:
        # password: never let OpenSSL prompt on the terminal for a passphrase.
        context.load_cert_chain(spec.path, spec.key_path, password=_no_password)
    except ssl.SSLError as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"{spec.path}: the private key in {key_file} does not match the certificate") from None
        raise TLSConfigError(f"{spec.path}: cannot load the certificate and key: {_reason(error)}") from None
    except OSError as error:  # the file changed under us between the checks and the load
        raise TLSConfigError(f"{spec.path}: cannot load the certificate and key: {_reason(error)}") from None
    not_after = ssl.cert_time_to_seconds(str(details["notAfter"]))
    loaded = LoadedCert(spec, *_alt_names(details), not_after=not_after, context=context)
    if not_after <= (time.time() if now is None else now):
        raise TLSConfigError(f"{spec.path}: the certificate expired on {loaded.expires}")
    return loaded


def _no_password() -> bytes:
    raise TLSConfigError("encrypted private key")


def _alt_names(details: dict[str, object]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) of a decoded certificate's subjectAltName."""
    entries = cast("tuple[tuple[str, str], ...]", details.get("subjectAltName", ()))
    dns = tuple(str(value).lower() for kind, value in entries if kind == "DNS")
    ips = tuple(str(value) for kind, value in entries if kind == "IP Address")
    return dns, ips


def load_certificates(specs: Sequence[CertSpec], min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                      now: float | None = None) -> list[LoadedCert]:
    """``load_certificate`` for each spec, in order; the first problem raises; none is an error."""
    if not specs:
        raise TLSConfigError("no TLS certificate given")
    return [load_certificate(spec, min_version, now) for spec in specs]


def normalise_server_name(name: str) -> str:
    """Lower case, without a trailing dot (DNS names are case-insensitive, RFC 4343)."""
    return name.strip().rstrip(".").lower()


def match_certificate(server_name: str | None, certs: Sequence[LoadedCert]) -> LoadedCert:
    """The certificate to serve for an SNI ``server_name`` (pure, no I/O).

    An exact subjectAltName DNS match in any certificate first, then a
    wildcard one (``*.example.com`` matches exactly one more label: ``a.example.com``,
    not ``example.com`` nor ``a.b.example.com``; RFC 6125 6.4.3), case-insensitive,
    trailing dot ignored; no name or no match: the first certificate.
    """
    if not certs:
        raise ValueError("no certificates to choose from")
    if not server_name:
        return certs[0]
    name = normalise_server_name(server_name)
    for cert in certs:
        if name in cert.dns_names:
            return cert
    label, dot, parent = name.partition(".")
    if label and dot and parent:
        wildcard = "*." + parent
        for cert in certs:
            if wildcard in cert.dns_names:
                return cert
    return certs[0]


def _front_context(current: Callable[[], Sequence[LoadedCert]], min_version: ssl.TLSVersion) -> ssl.SSLContext:
    """The listener's context: every handshake switches to the matching certificate's context.

    OpenSSL calls the servername callback for every ClientHello, with
    ``server_name`` None when the client sent no SNI (RFC 6066 3), before
    the certificate is chosen; ALPN and version bounds are configured the
    same on every context, so switching changes only the certificate.
    """
    context = _new_server_context(min_version)
    # The first certificate also on the front context: a handshake for which the
    # callback could not run (it raised) still gets a sensible certificate.
    first = current()[0]
    context.load_cert_chain(first.spec.path, first.spec.key_path, password=_no_password)

    def choose(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ssl_object.context = match_certificate(server_name, current()).context

    context.sni_callback = choose  # type: ignore[assignment]
    return context


def server_context(certs: Sequence[LoadedCert], min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    """A server SSLContext serving a fixed set of certificates, chosen per handshake by SNI.

    ``certs`` come from ``load_certificate(s)`` with the same ``min_version``.
    For certificates that change on SIGHUP use ``CertificateStore``.
    """
    fixed = tuple(certs)
    if not fixed:
        raise ValueError("no certificates to serve")
    return _front_context(lambda: fixed, min_version)


class CertificateStore:
    """The listener's certificates, re-readable while it serves.

    ``lock`` guards ``specs``, ``certs``, ``min_version`` and the front
    context's ``minimum_version`` (the SNI callback runs in
    whichever thread does the handshake, a reload in the signal/main thread).
    ``context`` is created once and never replaced: wrap the listener (or each
    accepted socket) with it; handshakes started after a ``reload`` get the
    new certificates.
    """

    def __init__(self, specs: Sequence[CertSpec], min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> None:
        """Load ``specs``; TLSConfigError (one line, naming the file) if any is unusable."""
        self.lock = threading.Lock()
        self.min_version = min_version
        self.specs: tuple[CertSpec, ...] = tuple(specs)
        self.certs: tuple[LoadedCert, ...] = tuple(load_certificates(self.specs, min_version))
        self.context = _front_context(self.current, min_version)

    def current(self) -> tuple[LoadedCert, ...]:
        """The certificates in force (a consistent snapshot)."""
        with self.lock:
            return self.certs

    def reload(self, specs: Sequence[CertSpec] | None = None,
               min_version: ssl.TLSVersion | None = None) -> TLSConfigError | None:
        """Re-read ``specs`` (default: the same files); None if the new set is in force.

        ``min_version`` (default: unchanged) applies to handshakes that start
        after the reload.  A bad new set changes nothing: the old certificates
        (and version) stay and the error is returned, for the caller to log,
        never raised.  Files are read outside the lock, so handshakes are not
        held up by a reload.
        """
        new_specs = tuple(self.specs if specs is None else specs)
        version = self.min_version if min_version is None else min_version
        try:
            certs = tuple(load_certificates(new_specs, version))
        except TLSConfigError as error:
            return error
        with self.lock:
            self.specs, self.certs, self.min_version = new_specs, certs, version
            # Version bounds are copied into each connection when it starts, from
            # the front context, so this affects new handshakes only.
            self.context.minimum_version = version
        return None


def client_context(ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """An SSLContext for HTTPS backends: verification on, hostname checked, ALPN http/1.1.

    ``ca_file`` (``--backend-ca``): trust only the CAs in that PEM file; None:
    the system trust store.  ``insecure`` (``--backend-insecure``): no
    certificate or hostname verification at all.  The caller wraps with
    ``context.wrap_socket(sock, server_hostname=url_host)``, which sends SNI
    (for a DNS name; RFC 6066 3 forbids IP literals there) and checks the
    certificate against that host (DNS or IP subjectAltName).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        text = _read_pem(ca_file, "CA")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise TLSConfigError(f"{ca_file}: no CA certificate found (expected a PEM 'BEGIN CERTIFICATE' block)")
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as error:
            raise TLSConfigError(f"{ca_file}: cannot load the CA certificates: {_reason(error)}") from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Read/write timeouts that work for TLS sockets too; use instead of ``socket_io.set_timeouts``.

    ``socket_io`` uses kernel timeouts (``SO_RCVTIMEO``) on a socket in
    blocking mode.  On an ``ssl.SSLSocket`` that hangs forever: OpenSSL sees
    EAGAIN as "want read", and CPython, believing the socket blocking,
    retries the read at once, again and again.  A Python-level timeout
    (``settimeout``) makes CPython wait with ``poll()`` and raise
    ``TimeoutError``, which ``socket_io.SocketReader``/``SocketWriter`` pass on
    unchanged.  Plain sockets keep the cheaper kernel timeouts.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
    else:
        import socket_io  # here, so that settings can import this module without the socket layer
        socket_io.set_timeouts(sock, seconds)


def describe_tls_error(error: BaseException) -> str:
    """One line for the log or a 502 reason: ``certificate verify failed: Hostname mismatch...``."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {error.verify_message}"
    return f"TLS error: {_reason(error)}"


__all__ = [
    "ALPN_PROTOCOLS", "INTERMEDIATE_CIPHERS", "CertSpec", "CertificateStore", "LoadedCert", "TLSConfigError",
    "client_context", "decode_certificate", "describe_tls_error", "load_certificate", "load_certificates",
    "match_certificate", "normalise_server_name", "parse_cert_option", "parse_min_version", "server_context",
    "set_timeouts",
]
