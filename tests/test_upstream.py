"""Unit tests for ``upstream``: ConnectionPool and UpstreamConnection on real sockets.

A small in-process TCP peer (a listening socket on 127.0.0.1, port 0) plays
the backend: it hands each accepted server-side socket to the test, which
can then close it or write unexpected bytes, exactly as a backend would.
"""

from __future__ import annotations

import http.client
import queue
import select
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import free_port, wait_for  # noqa: E402
from upstream import (BackendTLS, BackendTLSError, ConnectionPool, HeadDeadlineReader, IdleWatcher,  # noqa: E402
                      UpstreamConnection, describe_error)


class TcpPeer:
    """A listening socket whose accepted connections are queued for the test."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.accepted: queue.Queue[socket.socket] = queue.Queue()
        self.sockets: list[socket.socket] = []
        self.stopped = threading.Event()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.thread = threading.Thread(target=self._run, name="tcp-peer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self.wake_reader, selectors.EVENT_READ)
            while not self.stopped.is_set():
                selector.select()
                if self.stopped.is_set():
                    break
                try:
                    conn, _ = self.listener.accept()
                except (BlockingIOError, OSError):
                    continue
                conn.setblocking(True)
                conn.settimeout(5)
                self.sockets.append(conn)
                self.accepted.put(conn)

    def next_accepted(self) -> socket.socket:
        """The server side of the next connection a client opened."""
        return self.accepted.get(timeout=5)

    def stop(self) -> None:
        self.stopped.set()
        self.wake_writer.send(b"x")
        self.thread.join(timeout=5)
        self.listener.close()
        self.wake_reader.close()
        self.wake_writer.close()
        for conn in self.sockets:
            conn.close()


def peer_sees_eof(server_side: socket.socket) -> bool:
    """True if the client closed its end (the server reads end of stream)."""
    server_side.settimeout(5)
    try:
        return server_side.recv(1) == b""
    except ConnectionResetError:
        return True


class PoolTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.peer = TcpPeer()
        self.addCleanup(self.peer.stop)

    use_epoll = hasattr(select, "epoll")

    def make_pool(self, **options: float) -> ConnectionPool:
        """A pool with an idle watcher of its own (stopped at cleanup, after the pool retires)."""
        self.watcher = IdleWatcher(self.use_epoll)
        self.watcher.start()
        self.addCleanup(self.watcher.stop)
        pool = ConnectionPool("127.0.0.1", self.peer.port, connect_timeout=2.0,
                              read_timeout=2.0, watcher=self.watcher, **options)
        self.addCleanup(pool.retire)
        return pool

    def acquire(self, pool: ConnectionPool, owner: int = 0,
                own_only: bool = False) -> tuple[UpstreamConnection, bool]:
        conn, reused = pool.acquire(owner, own_only)
        self.addCleanup(conn.close)
        return conn, reused


class AcquireReleaseTests(PoolTestCase):
    def test_acquire_opens_a_new_connected_socket(self) -> None:
        """The first acquire connects to the backend and reports reused=False."""
        pool = self.make_pool()
        conn, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNotNone(conn.sock)
        server_side = self.peer.next_accepted()
        conn.send_all(b"ping")
        self.assertEqual(server_side.recv(4), b"ping")
        self.assertEqual(conn.sock.getpeername()[1], self.peer.port)

    def test_release_then_acquire_reuses_the_same_connection(self) -> None:
        """A released connection comes back as the same object, reused=True, still usable."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.release(conn)
        self.assertEqual(pool.idle, [conn])
        again, reused = self.acquire(pool)
        self.assertTrue(reused)
        self.assertIs(again, conn)
        self.assertEqual(pool.idle, [])
        again.send_all(b"same")
        self.assertEqual(server_side.recv(4), b"same")
        self.assertTrue(self.peer.accepted.empty(), "no second connection was opened")

    def test_most_recently_used_first(self) -> None:
        """Released a then b: acquire hands out b, then a."""
        pool = self.make_pool()
        a, _ = self.acquire(pool)
        b, _ = self.acquire(pool)
        self.assertIsNot(a, b)
        pool.release(a)
        pool.release(b)
        first, reused_first = self.acquire(pool)
        second, reused_second = self.acquire(pool)
        self.assertEqual((first, second), (b, a))
        self.assertTrue(reused_first and reused_second)

    def test_max_idle_caps_the_idle_list(self) -> None:
        """With max_idle=2, a third released connection is closed (the backend sees EOF)."""
        pool = self.make_pool(max_idle=2)
        conns = [self.acquire(pool)[0] for _ in range(3)]
        server_sides = [self.peer.next_accepted() for _ in range(3)]
        for conn in conns:
            pool.release(conn)
        self.assertEqual(pool.idle, conns[:2])
        self.assertIsNone(conns[2].sock)
        self.assertIsNotNone(conns[0].sock)
        self.assertIsNotNone(conns[1].sock)
        # Which server-side socket is which: match by the client's local port.
        by_port = {s.getpeername()[1]: s for s in server_sides}
        closed_side = next(s for port, s in by_port.items()
                           if port not in {c.sock.getsockname()[1] for c in conns[:2]})
        self.assertTrue(peer_sees_eof(closed_side))

    def test_max_idle_zero_never_pools(self) -> None:
        """max_idle=0: every release closes the connection."""
        pool = self.make_pool(max_idle=0)
        conn, _ = self.acquire(pool)
        pool.release(conn)
        self.assertEqual(pool.idle, [])
        self.assertIsNone(conn.sock)

    def test_idle_timeout_expiry_replaces_the_connection(self) -> None:
        """A connection idle longer than idle_timeout is closed and a new one opened."""
        pool = self.make_pool(idle_timeout=0.5)
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.release(conn)
        conn.idle_since = time.monotonic() - 10  # idle for 10 s, well past 0.5 s
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNot(fresh, conn)
        self.assertIsNone(conn.sock)
        self.assertTrue(peer_sees_eof(server_side))
        self.peer.next_accepted()  # the new connection did reach the backend

    def test_idle_within_timeout_is_reused(self) -> None:
        """The control case: idle for less than idle_timeout, the connection is reused."""
        pool = self.make_pool(idle_timeout=30.0)
        conn, _ = self.acquire(pool)
        pool.release(conn)
        conn.idle_since = time.monotonic() - 10
        again, reused = self.acquire(pool)
        self.assertTrue(reused)
        self.assertIs(again, conn)

    def test_connection_closed_by_backend_while_idle_is_replaced(self) -> None:
        """The backend closed an idle connection: looks_stale, and acquire opens a new one."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        self.assertFalse(conn.looks_stale())
        pool.release(conn)
        server_side.close()
        wait_for(conn.looks_stale, timeout=5, message="the client to see the FIN")
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNot(fresh, conn)
        self.assertIsNone(conn.sock, "the stale connection was closed")
        new_side = self.peer.next_accepted()
        fresh.send_all(b"ok")
        self.assertEqual(new_side.recv(2), b"ok")

    def test_unexpected_bytes_while_idle_make_the_connection_stale(self) -> None:
        """Bytes nobody asked for on an idle connection: it is not reused."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.release(conn)
        server_side.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        wait_for(conn.looks_stale, timeout=5, message="the garbage to arrive")
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNot(fresh, conn)
        self.assertIsNone(conn.sock)

    def test_looks_stale_after_close(self) -> None:
        """A closed connection (no socket) is always stale."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        conn.close()
        self.assertTrue(conn.looks_stale())

    def test_has_leftover_bytes(self) -> None:
        """Bytes received beyond what was read sit in the reader: has_leftover_bytes."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        self.assertFalse(conn.has_leftover_bytes())
        server_side.sendall(b"abcdef")
        while conn.reader.buffered < 6:  # one recv may not get everything
            self.assertTrue(conn.reader.fill(), "the peer closed early")
        received = conn.reader.read(2)
        self.assertEqual(bytes(received), b"ab")
        self.assertTrue(conn.has_leftover_bytes())
        self.assertEqual(conn.reader.read(4), b"cdef")
        self.assertFalse(conn.has_leftover_bytes())

    def test_connect_refused_raises_oserror(self) -> None:
        """Nothing listening: acquire raises OSError (refused) and pools nothing."""
        pool = ConnectionPool("127.0.0.1", free_port(), connect_timeout=2.0, read_timeout=2.0)
        with self.assertRaises(OSError) as caught:
            pool.acquire()
        self.assertIsInstance(caught.exception, ConnectionRefusedError)
        self.assertEqual(describe_error(caught.exception), "connection refused")
        self.assertEqual(pool.idle, [])


class GenerationTests(PoolTestCase):
    """Regression: connections in flight during close_all()/retire() are not pooled later."""

    def test_close_all_closes_idle_connections(self) -> None:
        """close_all closes what is idle now (the backend sees EOF)."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.release(conn)
        pool.close_all()
        self.assertEqual(pool.idle, [])
        self.assertIsNone(conn.sock)
        self.assertTrue(peer_sees_eof(server_side))

    def test_connection_released_after_close_all_is_closed_not_pooled(self) -> None:
        """Acquired before close_all, released after: closed, never handed out again."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.close_all()
        pool.release(conn)
        self.assertEqual(pool.idle, [])
        self.assertIsNone(conn.sock)
        self.assertTrue(peer_sees_eof(server_side))
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNot(fresh, conn)

    def test_connection_opened_after_close_all_is_pooled(self) -> None:
        """The new generation pools normally."""
        pool = self.make_pool()
        pool.close_all()
        conn, _ = self.acquire(pool)
        pool.release(conn)
        self.assertEqual(pool.idle, [conn])
        again, reused = self.acquire(pool)
        self.assertTrue(reused)
        self.assertIs(again, conn)

    def test_nothing_is_pooled_after_retire(self) -> None:
        """retire: idle and in-flight connections are closed, and later ones too."""
        pool = self.make_pool()
        in_flight, _ = self.acquire(pool)
        idle, _ = self.acquire(pool)
        pool.release(idle)
        pool.retire()
        self.assertIsNone(idle.sock)
        pool.release(in_flight)
        self.assertIsNone(in_flight.sock)
        later, reused = self.acquire(pool)
        self.assertFalse(reused)
        pool.release(later)
        self.assertIsNone(later.sock)
        self.assertEqual(pool.idle, [])


class IdleWatcherTests(PoolTestCase):
    """The idle watcher closes a pooled connection that becomes readable, and only an idle one."""

    def test_an_idle_connection_is_armed_and_disarmed_when_handed_out(self) -> None:
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        self.assertEqual(self.watcher.watched(), 0)
        pool.release(conn)
        wait_for(lambda: self.watcher.watched() == 1, 5, message="the watcher to arm it")
        again, reused = self.acquire(pool)
        self.assertTrue(reused)
        self.assertFalse(again.watched)
        self.assertEqual(self.watcher.watched(), 0, "a handed-out connection is not watched")
        pool.release(again)
        wait_for(lambda: self.watcher.watched() == 1, 5, message="the watcher to arm it again")
        pool.close_all()
        self.assertEqual(self.watcher.watched(), 0, "close_all stops watching what it closes")

    def test_a_connection_reused_at_once_costs_no_arming(self) -> None:
        """release and acquire never arm or disarm by themselves (the hot path): only the
        watcher's rounds do (here there are none: its thread is not started)."""
        watcher = IdleWatcher()
        self.addCleanup(watcher.stop)
        pool = ConnectionPool("127.0.0.1", self.peer.port, 2.0, 2.0, watcher=watcher)
        self.addCleanup(pool.retire)
        conn, _ = self.acquire(pool)
        for _ in range(3):
            pool.release(conn)
            conn, reused = self.acquire(pool)
            self.assertTrue(reused)
        self.assertFalse(conn.watched)
        self.assertEqual(watcher.entries, {}, "no system call spent on it")

    def test_unsolicited_bytes_on_an_idle_connection_close_it_at_once(self) -> None:
        """Bytes arrive while idle: the watcher closes it (no acquire needed) and the backend sees EOF."""
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.release(conn)
        server_side.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
        wait_for(lambda: pool.idle == [], 5, message="the watcher to drop the connection")
        self.assertIsNone(conn.sock, "the dropped connection was closed")
        self.assertTrue(peer_sees_eof(server_side))
        self.assertEqual(self.watcher.discarded, 1)
        self.assertEqual(self.watcher.watched(), 0)
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNot(fresh, conn)

    def test_backend_closing_an_idle_connection_closes_ours(self) -> None:
        pool = self.make_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        pool.release(conn)
        server_side.close()
        wait_for(lambda: conn.sock is None, 5, message="the watcher to close the connection")
        self.assertEqual(pool.idle, [])

    def test_a_connection_in_use_is_never_touched(self) -> None:
        """Bytes on a handed-out connection are its response: the watcher leaves it alone.

        A second, idle connection receiving bytes bounds the wait: once the
        watcher has dropped it, it has seen every readable descriptor.
        """
        pool = self.make_pool()
        busy, _ = self.acquire(pool)
        busy_side = self.peer.next_accepted()
        idle, _ = self.acquire(pool)
        idle_side = self.peer.next_accepted()
        pool.release(idle)
        busy_side.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        idle_side.sendall(b"x")
        wait_for(lambda: idle.sock is None, 5, message="the watcher to drop the idle connection")
        self.assertIsNotNone(busy.sock, "the watcher closed a connection in use")
        self.assertEqual(busy.reader.readline(), b"HTTP/1.1 204 No Content\r\n")
        self.assertEqual(self.watcher.discarded, 1)

    def test_a_descriptor_closed_behind_the_pools_back_does_not_block_its_successor(self) -> None:
        """A socket closed while pooled (a bug elsewhere) leaves a stale entry; its number's
        next owner is still watched."""
        pool = self.make_pool()
        first, _ = self.acquire(pool)
        self.peer.next_accepted()  # accepted before the number is freed
        pool.release(first)
        number = first.sock.fileno()
        first.sock.close()  # behind the pool's back: the entry for `number` is stale
        pool.idle.clear()
        second, _ = self.acquire(pool)
        self.assertEqual(second.sock.fileno(), number, "the kernel reused the lowest free number")
        server_side = self.peer.next_accepted()
        pool.release(second)
        self.assertEqual(pool.idle, [second])
        server_side.sendall(b"x")
        wait_for(lambda: second.sock is None, 5, message="the watcher to drop the successor")

    def test_connections_idle_too_long_are_swept(self) -> None:
        """Past idle_timeout, the watcher closes an idle connection nobody took."""
        pool = self.make_pool(idle_timeout=30.0)
        self.watcher.sweep_period = 0.05
        old, _ = self.acquire(pool)
        old_side = self.peer.next_accepted()
        recent, _ = self.acquire(pool)
        pool.release(old)
        pool.release(recent)
        old.idle_since -= 60  # idle for a minute, well past 30 s
        self.assertTrue(peer_sees_eof(old_side), "the backend saw the old connection close")
        self.assertEqual(pool.idle, [recent])
        self.assertIsNone(old.sock)
        self.assertEqual(self.watcher.watched(), 1)

    def test_the_watcher_survives_a_fault_and_stops(self) -> None:
        """A fault while checking one connection is logged; the next one is still dropped,
        and the faulted one is still never handed out (the acquire-time poll)."""
        pool = self.make_pool()
        faulted, _ = self.acquire(pool)
        faulted_side = self.peer.next_accepted()
        later, _ = self.acquire(pool)
        later_side = self.peer.next_accepted()
        original = pool.discard_if_stale

        def faulty(target: UpstreamConnection) -> bool:
            if target is faulted:
                raise RuntimeError("injected fault")
            return original(target)
        pool.discard_if_stale = faulty  # type: ignore[method-assign]
        with self.assertLogs("cclb", "ERROR") as logs:
            pool.release(faulted)
            faulted_side.sendall(b"x")
            wait_for(lambda: self.watcher.guard.failures, 5, message="the fault")
            pool.release(later)
            later_side.sendall(b"x")
            wait_for(lambda: later.sock is None, 5, message="the next event to drop its connection")
        self.assertIn("RuntimeError: injected fault", "\n".join(logs.output))
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused, "the connection with unread bytes was handed out")
        self.assertIsNot(fresh, faulted)
        thread = self.watcher.thread
        self.watcher.stop()
        self.assertFalse(thread is not None and thread.is_alive())


class PortableIdleWatcherTests(IdleWatcherTests):
    """The same, on the selectors path used where there is no epoll."""

    use_epoll = False


class OwnerRuleTests(PoolTestCase):
    """--upstream-reuse safe: a client connection's first request only reuses its own connections."""

    def test_own_only_never_hands_out_another_clients_connection(self) -> None:
        pool = self.make_pool()
        mine, _ = self.acquire(pool, owner=1)
        self.assertEqual(mine.owner, 1)
        pool.release(mine)
        other, reused = self.acquire(pool, owner=2, own_only=True)
        self.assertFalse(reused)
        self.assertIsNot(other, mine)
        self.assertEqual(other.owner, 2)
        self.assertEqual(pool.idle, [mine], "client 1's connection stays pooled")

    def test_own_only_reuses_the_owners_connection_even_if_not_the_newest(self) -> None:
        pool = self.make_pool()
        mine, _ = self.acquire(pool, owner=1)
        theirs, _ = self.acquire(pool, owner=2)
        pool.release(mine)
        pool.release(theirs)  # most recently used
        again, reused = self.acquire(pool, owner=1, own_only=True)
        self.assertTrue(reused)
        self.assertIs(again, mine)
        self.assertEqual(pool.idle, [theirs])

    def test_later_requests_reuse_any_connection(self) -> None:
        """Without own_only (a later request, or --upstream-reuse always): most recently used."""
        pool = self.make_pool()
        theirs, _ = self.acquire(pool, owner=2)
        pool.release(theirs)
        again, reused = self.acquire(pool, owner=1)
        self.assertTrue(reused)
        self.assertIs(again, theirs)
        self.assertEqual(again.owner, 1, "the connection now serves client 1")


class HeadDeadlineReaderTests(unittest.TestCase):
    """A whole-head deadline over per-read kernel timeouts."""

    def pair(self, read_timeout: float) -> tuple[socket.socket, socket.socket, HeadDeadlineReader]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        from socket_io import set_timeouts
        set_timeouts(ours, read_timeout)
        return ours, theirs, HeadDeadlineReader(ours, read_timeout)

    def kernel_timeout(self, sock: socket.socket) -> float:
        seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        return seconds + micros / 1e6

    def test_a_dribbled_head_times_out_at_the_deadline(self) -> None:
        ours, theirs, reader = self.pair(read_timeout=2.0)
        stop = threading.Event()

        def dribble() -> None:
            while not stop.is_set():
                try:
                    theirs.send(b"X")  # never a line end
                except OSError:
                    return
                stop.wait(0.05)  # the dribbling pace is the behaviour under test
        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(stop.set)  # runs first
        started = time.monotonic()
        reader.deadline = started + 0.4
        with self.assertRaises(TimeoutError):
            reader.readline(65536)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.39)
        self.assertLess(elapsed, 1.5, "each byte restarted the per-read timeout")
        reader.end_deadline()
        self.assertAlmostEqual(self.kernel_timeout(ours), 2.0, places=2)

    def test_a_head_in_one_segment_changes_no_timeout(self) -> None:
        ours, theirs, reader = self.pair(read_timeout=2.0)
        theirs.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        reader.deadline = time.monotonic() + 2.0
        self.assertEqual(reader.readline(), b"HTTP/1.1 204 No Content\r\n")
        self.assertEqual(reader.kernel_timeout, 2.0, "no setsockopt on the fast path")
        reader.end_deadline()
        self.assertEqual(reader.deadline, 0.0)

    def test_a_silent_peer_times_out_at_the_deadline_too(self) -> None:
        ours, theirs, reader = self.pair(read_timeout=5.0)
        theirs.sendall(b"HTTP/1.1 ")
        started = time.monotonic()
        reader.deadline = started + 0.3
        with self.assertRaises(TimeoutError):
            reader.readline()
        self.assertLess(time.monotonic() - started, 1.5)


class DescribeErrorTests(unittest.TestCase):
    def test_texts(self) -> None:
        """Each kind of failure gets its short, stable description."""
        mismatch = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'x'."
        cases: list[tuple[BaseException, str]] = [
            (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
            (ConnectionResetError(104, "Connection reset by peer"), "connection reset"),
            (socket.timeout("timed out"), "timed out"),
            (TimeoutError(), "timed out"),
            (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
             "cannot resolve host (Name or service not known)"),
            (http.client.BadStatusLine("garbage"), "invalid answer (BadStatusLine)"),
            (http.client.RemoteDisconnected("closed"), "connection reset"),
            (OSError("no route to host"), "no route to host"),
            (OSError(), "OSError"),
            (BrokenPipeError(), "BrokenPipeError"),
            (mismatch, "certificate verify failed: Hostname mismatch, certificate is not valid for 'x'."),
            (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
             "TLS error: EOF occurred in violation of protocol"),
        ]
        for error, text in cases:
            with self.subTest(error=repr(error)):
                self.assertEqual(describe_error(error), text)


CERTS = ROOT / "tests" / "certs"
CA = str(CERTS / "ca.pem")


class TlsPeer(TcpPeer):
    """A ``TcpPeer`` whose connections are TLS (``localhost.pem``: DNS:localhost, IP:127.0.0.1).

    The handshakes run in a thread of their own, one after the other, so the
    pool's connect (which waits for its handshake) can run in the test thread.
    """

    def __init__(self) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(CERTS / "localhost.pem"))
        self.context.set_alpn_protocols(["http/1.1"])
        self.handshaken: queue.Queue[ssl.SSLSocket | OSError] = queue.Queue()
        super().__init__()
        self.wrapper = threading.Thread(target=self._wrap, name="tls-peer", daemon=True)
        self.wrapper.start()

    def _wrap(self) -> None:
        while True:
            raw = self.accepted.get()
            if raw is None:
                return
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
            except OSError as error:  # the client refused our certificate
                self.handshaken.put(error)
                continue
            self.sockets.append(conn)
            self.handshaken.put(conn)

    def next_accepted(self) -> ssl.SSLSocket:  # type: ignore[override]
        item = self.handshaken.get(timeout=5)
        if isinstance(item, OSError):
            raise item
        return item

    def stop(self) -> None:
        self.accepted.put(None)  # type: ignore[arg-type]
        self.wrapper.join(timeout=5)
        super().stop()


class TLSPoolTests(PoolTestCase):
    """https:// backends: verified, pooled and reused, watched, timed out, like plain ones."""

    def setUp(self) -> None:
        self.peer = TlsPeer()
        self.addCleanup(self.peer.stop)

    def make_tls_pool(self, backend_tls: BackendTLS | None = None) -> ConnectionPool:
        pool = self.make_pool()
        pool.tls = backend_tls or BackendTLS(CA)
        return pool

    def exchange(self, conn: UpstreamConnection, server_side: ssl.SSLSocket) -> None:
        """One request and response over ``conn``, read completely."""
        conn.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertEqual(server_side.recv(100), b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        server_side.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(conn.reader.readline(), b"HTTP/1.1 204 No Content\r\n")
        self.assertEqual(conn.reader.readline(), b"\r\n")

    def test_a_verified_connection_is_reused_with_python_level_timeouts(self) -> None:
        pool = self.make_tls_pool()
        conn, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsInstance(conn.sock, ssl.SSLSocket)
        self.assertEqual(conn.sock.gettimeout(), 2.0, "tls.set_timeouts: settimeout, not SO_RCVTIMEO")
        self.assertEqual(conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16), bytes(16))
        self.assertEqual(conn.sock.selected_alpn_protocol(), "http/1.1")
        server_side = self.peer.next_accepted()
        for _ in range(3):
            self.exchange(conn, server_side)
            self.assertFalse(conn.has_leftover_bytes())
            pool.release(conn)
            again, reused = self.acquire(pool)
            self.assertTrue(reused)
            self.assertIs(again, conn)

    def test_decrypted_bytes_waiting_in_openssl_make_it_stale(self) -> None:
        """poll() sees the descriptor, not what OpenSSL already decrypted: pending() does."""
        pool = self.make_tls_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        self.exchange(conn, server_side)
        server_side.sendall(b"EVIL")  # one record
        wait_for(lambda: conn.poller.poll(0), 5, message="the record to arrive")
        self.assertEqual(conn.sock.recv(1), b"E")  # the rest of the record stays inside OpenSSL
        self.assertEqual(conn.poller.poll(0), [], "the descriptor looks quiet")
        self.assertTrue(conn.has_leftover_bytes())
        self.assertTrue(conn.looks_stale())
        pool.release(conn)  # (the proxy would not, because of has_leftover_bytes)
        fresh, reused = self.acquire(pool)
        self.assertFalse(reused)
        self.assertIsNot(fresh, conn)

    def test_the_idle_watcher_closes_a_tls_connection_the_backend_closed(self) -> None:
        pool = self.make_tls_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        self.exchange(conn, server_side)
        pool.release(conn)
        server_side.close()
        wait_for(lambda: conn.sock is None, 5, message="the watcher to close the connection")
        self.assertEqual(pool.idle, [])

    def test_the_head_deadline_shrinks_the_python_timeout_never_so_rcvtimeo(self) -> None:
        pool = self.make_tls_pool()
        conn, _ = self.acquire(pool)
        server_side = self.peer.next_accepted()
        server_side.sendall(b"HTTP/1.1 ")
        started = time.monotonic()
        conn.reader.deadline = started + 0.3
        with self.assertRaises(TimeoutError):
            conn.reader.readline()
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertLessEqual(conn.sock.gettimeout(), 0.3)
        conn.reader.end_deadline()
        self.assertEqual(conn.sock.gettimeout(), 2.0)
        self.assertEqual(conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16), bytes(16))

    def test_verification_failures_and_a_bad_ca_file_are_oserrors_that_say_so(self) -> None:
        pool = self.make_tls_pool(BackendTLS())  # the system store does not know the test CA
        with self.assertRaises(ssl.SSLCertVerificationError) as caught:
            pool.acquire()
        self.assertTrue(describe_error(caught.exception).startswith("certificate verify failed: "),
                        describe_error(caught.exception))
        self.assertEqual(pool.idle, [])
        pool = self.make_tls_pool(BackendTLS("/nonexistent/ca.pem"))
        with self.assertRaises(BackendTLSError) as bad:
            pool.acquire()
        self.assertIsInstance(bad.exception, OSError)  # the proxy's connect-failure path
        self.assertIn("/nonexistent/ca.pem", describe_error(bad.exception))

    def test_https_pools_get_the_clusters_settings_and_a_reload_replaces_them(self) -> None:
        import settings
        from cluster import ServerCluster
        argv = ["-b", "https://localhost:1", "-b", "http://localhost:2"]
        old = settings.load(argv).pools["default"]
        new = settings.load(argv + ["--backend-ca", CA]).pools["default"]
        cluster = ServerCluster.from_settings(old)
        self.addCleanup(lambda: [backend.pool.retire() for backend in cluster.snapshot()])
        secure, plain = cluster.snapshot()
        self.assertIs(secure.pool.tls, cluster.backend_tls)
        self.assertEqual((secure.pool.tls.ca_file, secure.pool.tls.insecure), (None, False))
        self.assertIsNone(plain.pool.tls)
        cluster.apply_settings(old, new)
        self.assertEqual(secure.pool.tls.ca_file, CA)  # new connections use the new CA file
        self.assertIsNone(plain.pool.tls)

    def test_one_context_per_settings_and_a_warning_when_insecure(self) -> None:
        backend_tls = BackendTLS(CA)
        self.assertIs(backend_tls.context(), backend_tls.context())
        self.assertTrue(backend_tls.context().check_hostname)

        class Pool:  # the two fields BackendTLS.of reads from PoolSettings
            backend_ca = None
            backend_insecure = True
        with self.assertLogs("cclb", "WARNING") as logs:
            insecure = BackendTLS.of(Pool())  # type: ignore[arg-type]
            BackendTLS.of(Pool(), insecure)  # type: ignore[arg-type]  # a reload: said already
        self.assertEqual(len(logs.output), 1)
        self.assertIn("NOT verified", logs.output[0])
        self.assertEqual(insecure.context().verify_mode, ssl.CERT_NONE)


if __name__ == "__main__":
    unittest.main()
