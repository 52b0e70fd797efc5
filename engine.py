"""The connection engine: one selector thread, a timer heap, a FIFO queue, a bounded pool.

The gthread model (gunicorn's threaded worker; Tomcat NIO, Jetty): a
connection costs a thread only while a request is being served.

- The **selector thread** owns every connection that is *parked*: newly
  accepted ones, idle keep-alive ones, those whose request head (or a small
  body cclb buffers anyway) is still arriving, and TLS handshakes in
  progress.  When one becomes ready it calls the connection's ``on_ready``,
  which reads what is there without blocking and says what comes next
  (``Verdict``).  A slow or idle client costs a buffer and a registration.
- **Deadlines** (head, keep-alive, handshake, body silence) sit in one timer
  heap that the selector thread serves between two polls; past one it calls
  ``on_deadline``.
- A connection that is ready to be served (a complete request head, never
  mere readability) goes into a **FIFO queue** (``queue.SimpleQueue``:
  ``queue.Queue`` costs about 20% of throughput with large pools), and one of
  ``threads`` pre-started **pool threads** runs its ``run()`` with blocking
  I/O, as before.  ``run()`` either parks the connection again
  (``Engine.park``), closes it, or hands it to a thread of its own.  Waiting
  requests queue instead of all contending for the GIL at once: that is what
  keeps the tail latency short under load.  How many of the pool threads
  may serve at once adapts to the load (``adapt``): a CPU-bound process
  runs few (less GIL contention), one waiting on slow backends many.

Parking from a pool thread re-arms the socket in the kernel's poll set
directly (epoll is thread-safe; ``EPOLLONESHOT`` means a connection being
served is never reported), so a keep-alive request costs one wake-up of the
selector thread, not two.  Where epoll is missing, arming is handed to the
selector thread instead.

Ownership rule: a connection is touched by exactly one thread at a time,
the selector thread while it is parked (from ``park`` until ``on_ready`` or
``on_deadline`` returns), else the thread running it.  ``lock`` guards the
parked table, the timer heap and ``wake_at``; every hand-over goes through
it or through the queue, so nothing relies on the GIL.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import os
import queue
import resource
import select
import selectors
import socket
import ssl
import threading
import time
from bisect import bisect_left
from typing import Callable, Protocol, Sequence

from loops import LoopGuard

log = logging.getLogger("cclb")

READ = select.POLLIN
WRITE = select.POLLOUT
# The longest the selector thread sleeps without looking at its timers and
# its queue of calls (a parked deadline is met within this much, or sooner
# when a new one is earlier than the current sleep).
MAX_SLEEP = 1.0
RECV_SIZE = 65536
# How many pool threads may serve at once adapts (``Engine.adapt``) between
# min(MIN_ACTIVE, threads) and ``threads``, every ADAPT_PERIOD seconds: more
# while requests wait and the process has CPU to spare (threads blocked on
# slow backends), fewer while it is CPU-bound (more runnable threads then
# only fight over the GIL: measured, 64 cost 40% more CPU per request than 16).
MIN_ACTIVE = 16
ADAPT_PERIOD = 0.5


class Verdict(enum.Enum):
    """What a parked connection asks for after ``on_ready`` or ``on_deadline``."""

    WAIT = "wait"  # stay parked: re-armed for ``interest`` until ``deadline``
    RUN = "run"  # queue it for a pool thread
    CLOSE = "close"  # the engine calls its ``close()``
    GONE = "gone"  # someone else owns it now: the engine forgets it


class Connection(Protocol):
    """What the engine parks and runs (``proxy.ProxyHandler`` in cclb)."""

    deadline: float  # monotonic; re-read whenever the connection is (re)parked
    interest: int  # READ or WRITE: what the connection waits for while parked

    def fileno(self) -> int: ...

    def on_ready(self, events: int) -> Verdict:
        """The selector thread: the socket is ready (read what is there, never block)."""

    def on_deadline(self) -> Verdict:
        """The selector thread: ``deadline`` passed while parked."""

    def run(self) -> None:
        """A pool thread: serve; park (``Engine.park``), close, or hand the connection on."""

    def close(self) -> None:
        """Close for good (the engine calls it for ``Verdict.CLOSE`` and when it stops)."""


class _Wakeup:
    """A self-pipe: a byte written from any thread wakes the selector thread."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.lock = threading.Lock()
        self.pending = False  # a byte is in the pipe and not drained yet; guarded by lock

    def wake(self) -> None:
        with self.lock:
            if self.pending:
                return
            self.pending = True
        try:
            os.write(self.write_fd, b"\0")
        except OSError:  # full (cannot be: one byte at a time) or closed at stop
            pass

    def drain(self) -> None:
        with self.lock:  # cleared before the caller looks at what it was woken for
            self.pending = False
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class _EpollArming:
    """Arms sockets in an epoll set, one-shot, from any thread."""

    direct = True

    def __init__(self) -> None:
        self.epoll = select.epoll()

    def add_wakeup(self, fd: int) -> None:
        self.epoll.register(fd, select.EPOLLIN)

    def arm(self, fd: int, interest: int) -> None:
        """Report ``fd`` once when ready for ``interest``; OSError if ``fd`` is closed."""
        events = (select.EPOLLOUT if interest & WRITE else select.EPOLLIN) | select.EPOLLONESHOT
        try:
            self.epoll.modify(fd, events)
        except FileNotFoundError:  # never registered, or closed since (which unregisters)
            self.epoll.register(fd, events)

    def disarm(self, fd: int) -> None:
        try:
            self.epoll.modify(fd, select.EPOLLONESHOT)  # registered, reports nothing
        except OSError:
            pass

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        try:
            return self.epoll.poll(timeout)
        except InterruptedError:
            return []

    def close(self) -> None:
        self.epoll.close()


class _SelectorArming:
    """The same on any ``selectors`` selector; ``arm`` only on the selector thread."""

    direct = False

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def add_wakeup(self, fd: int) -> None:
        self.selector.register(fd, selectors.EVENT_READ)

    def arm(self, fd: int, interest: int) -> None:
        events = selectors.EVENT_WRITE if interest & WRITE else selectors.EVENT_READ
        try:
            self.selector.modify(fd, events)
        except KeyError:
            self.selector.register(fd, events)

    def disarm(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        ready = []
        for key, mask in self.selector.select(timeout):
            events = (READ if mask & selectors.EVENT_READ else 0) | (WRITE if mask & selectors.EVENT_WRITE else 0)
            ready.append((key.fd, events))
        return ready

    def one_shot(self, fd: int, wakeup_fd: int) -> None:
        if fd != wakeup_fd:
            self.disarm(fd)

    def close(self) -> None:
        self.selector.close()


class QueueStats:
    """The FIFO queue's numbers: how long requests waited for a pool thread.

    ``lock`` guards everything.  ``bounds`` are histogram bucket upper bounds
    (seconds); ``counts`` has one more entry, for +Inf.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.lock = threading.Lock()
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0  # seconds waited, summed
        self.count = 0  # connections taken off the queue
        self.busy = 0  # pool threads running a connection now
        self.window_count = 0  # since the last ``window()``
        self.window_total = 0.0

    def observe(self, waited: float) -> None:
        with self.lock:
            self.counts[bisect_left(self.bounds, waited)] += 1
            self.total += waited
            self.count += 1
            self.busy += 1
            self.window_count += 1
            self.window_total += waited

    def window(self) -> tuple[int, float]:
        """(dequeued, seconds waited) since the previous call."""
        with self.lock:
            window = self.window_count, self.window_total
            self.window_count, self.window_total = 0, 0.0
            return window

    def done(self) -> None:
        with self.lock:
            self.busy -= 1

    def snapshot(self) -> tuple[list[int], float, int, int]:
        """(bucket counts, seconds waited in all, requests dequeued, busy pool threads)."""
        with self.lock:
            return list(self.counts), self.total, self.count, self.busy


DEFAULT_BOUNDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Engine:
    """The selector thread, its timer heap, the FIFO queue and the pool (see the module doc).

    ``park``, ``submit``, ``dispatch`` and ``call_soon`` may be called from
    any thread.  ``start`` pre-starts the pool; ``resize`` changes its size
    (a reload); ``stop`` closes every parked connection and ends the threads.
    """

    def __init__(self, threads: int, name: str = "engine", bounds: Sequence[float] = DEFAULT_BOUNDS,
                 use_epoll: bool = True, adaptive: bool = True) -> None:
        if threads < 1:
            raise ValueError("an engine needs at least one pool thread")
        self.name = name
        self.size = threads  # the pool size asked for; guarded by lock
        self.lock = threading.Lock()
        self.parked: dict[int, Connection] = {}  # fd -> parked connection; guarded by lock
        self.timers: list[tuple[float, int, Connection]] = []  # heap; guarded by lock
        self.timer_of: dict[int, int] = {}  # id(connection) -> its live timer's sequence number
        self.sequence = itertools.count()
        self.wake_at = 0.0  # when the selector thread looks at the timers next; guarded by lock
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.queue: queue.SimpleQueue[tuple[Connection, float] | None] = queue.SimpleQueue()
        self.stats = QueueStats(bounds)
        self.arming: _EpollArming | _SelectorArming = (
            _EpollArming() if use_epoll and hasattr(select, "epoll") else _SelectorArming())
        self.wakeup = _Wakeup()
        self.arming.add_wakeup(self.wakeup.read_fd)
        self.guard = LoopGuard(f"{name} selector")
        self.pool_guard = LoopGuard(f"{name} pool")
        self.started = False
        self.stopping = False  # guarded by lock
        self.selector_thread: threading.Thread | None = None
        self.workers: list[threading.Thread] = []  # guarded by lock
        self.retiring = 0  # pool threads asked to end (a smaller pool); guarded by lock
        # ``slots`` (its own lock) guards ``limit`` (pool threads that may serve at
        # once), ``active`` (threads holding one of those places) and ``closing``.
        self.slots = threading.Condition(threading.Lock())
        self.adaptive = adaptive
        self.minimum = min(MIN_ACTIVE, threads) if adaptive else threads
        self.limit = self.minimum
        self.active = 0
        self.closing = False
        self.adapted_at = time.monotonic()  # the selector thread's, like cpu_mark
        self.cpu_mark = time.process_time()

    # --- life ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the selector thread and the pool (once)."""
        with self.lock:
            if self.started or self.stopping:
                return
            self.started = True
            size = self.size
        self.selector_thread = threading.Thread(target=self._select_loop, name=f"{self.name}-selector",
                                                daemon=True)
        self.selector_thread.start()
        self._add_workers(size)

    def _add_workers(self, count: int) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._work, name=f"{self.name}-pool", daemon=True)
            with self.lock:
                self.workers.append(thread)
            thread.start()

    def resize(self, threads: int) -> None:
        """Grow or shrink the pool to ``threads`` (a shrinking pool ends threads as they come free)."""
        if threads < 1:
            raise ValueError("an engine needs at least one pool thread")
        with self.lock:
            change = threads - self.size
            self.size = threads
            started = self.started and not self.stopping
            if change < 0:
                self.retiring += -change
        with self.slots:
            self.minimum = min(MIN_ACTIVE, threads) if self.adaptive else threads
            self.limit = max(self.minimum, min(self.limit, threads))
            self.slots.notify_all()
        if not started:
            return
        if change > 0:
            self._add_workers(change)
        for _ in range(-change):
            self.queue.put(None)

    def stop(self, wait: float = 0.0) -> None:
        """Close every parked connection, end the selector thread and the pool.

        Connections being served finish their request; parking one afterwards closes it.
        """
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            workers = len(self.workers)
            started = self.started
        if not started:  # no selector thread to close them
            self.arming.close()
            self.wakeup.close()
            return
        with self.slots:
            self.closing = True
            self.slots.notify_all()
        for _ in range(workers):
            self.queue.put(None)
        self.wakeup.wake()
        if wait and self.selector_thread is not None:
            self.selector_thread.join(wait)

    @property
    def threads(self) -> int:
        """Pool threads alive now."""
        with self.lock:
            return len(self.workers)

    def thread_limit(self) -> int:
        """Pool threads allowed to serve at once now (see ``adapt``)."""
        with self.slots:
            return self.limit

    def parked_count(self) -> int:
        """Connections parked in the selector thread now."""
        with self.lock:
            return len(self.parked)

    def queue_length(self) -> int:
        """Connections waiting in the FIFO for a pool thread (approximate)."""
        return self.queue.qsize()

    # --- hand-overs (any thread) -----------------------------------------------------

    def park(self, connection: Connection, deadline: float | None = None) -> None:
        """Give ``connection`` to the selector thread until it is ready or ``deadline`` passes."""
        if deadline is not None:
            connection.deadline = deadline
        try:
            fd = connection.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd < 0:
            self._close(connection)
            return
        wake = False
        with self.lock:
            if self.stopping:
                closed = True
            else:
                closed = False
                self.parked[fd] = connection
                self._set_timer(connection)
                if connection.deadline < self.wake_at:
                    wake = True
                if self.arming.direct:
                    try:
                        self.arming.arm(fd, connection.interest)
                    except OSError:
                        del self.parked[fd]
                        self.timer_of.pop(id(connection), None)
                        closed = True
        if closed:
            self._close(connection)
            return
        if not self.arming.direct:
            self.call_soon(lambda: self._arm_here(fd, connection))
        elif wake:
            self.wakeup.wake()

    def submit(self, connection: Connection) -> None:
        """Queue ``connection`` for a pool thread (first come, first served)."""
        self.queue.put((connection, time.monotonic()))

    def dispatch(self, connection: Connection, verdict: Verdict) -> None:
        """Do what ``verdict`` says for a connection this thread owns."""
        if verdict is Verdict.RUN:
            self.submit(connection)
        elif verdict is Verdict.WAIT:
            self.park(connection)
        elif verdict is Verdict.CLOSE:
            self._close(connection)

    def call_soon(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the selector thread soon."""
        self.calls.put(call)
        self.wakeup.wake()

    # --- the selector thread ---------------------------------------------------------

    def _set_timer(self, connection: Connection) -> None:
        """Caller holds ``lock``.  Stale heap entries are skipped when they come up."""
        number = next(self.sequence)
        self.timer_of[id(connection)] = number
        heapq.heappush(self.timers, (connection.deadline, number, connection))
        if len(self.timers) > 2 * len(self.timer_of) + 1024:  # mostly stale: rebuild
            self.timers = [entry for entry in self.timers if self.timer_of.get(id(entry[2])) == entry[1]]
            heapq.heapify(self.timers)

    def _arm_here(self, fd: int, connection: Connection) -> None:
        with self.lock:
            if self.parked.get(fd) is not connection:
                return
            try:
                self.arming.arm(fd, connection.interest)
                return
            except OSError:
                del self.parked[fd]
                self.timer_of.pop(id(connection), None)
        self._close(connection)

    def _select_loop(self) -> None:
        wakeup_fd = self.wakeup.read_fd
        while True:
            with self.lock:
                if self.stopping:
                    break
                now = time.monotonic()
                timeout = min(MAX_SLEEP, max(0.0, self.adapted_at + ADAPT_PERIOD - now))
                if self.timers:
                    timeout = min(timeout, max(0.0, self.timers[0][0] - now))
                self.wake_at = now + timeout
            ready = self.arming.poll(timeout)
            with self.guard:
                self._round(ready, wakeup_fd)
            now = time.monotonic()
            if now >= self.adapted_at + ADAPT_PERIOD:
                with self.guard:
                    self.adapt(now)
        self._shut_down()

    def adapt(self, now: float) -> None:
        """Let more pool threads serve at once, or fewer (see MIN_ACTIVE); every ADAPT_PERIOD.

        Double while requests waited in the queue (5 ms on average) and
        the process used under 75% of a core; shrink by an
        eighth while it used over 90%.  The GIL makes one process worth
        about one core, so that is the measure of CPU-bound.
        """
        cpu = time.process_time()
        used = (cpu - self.cpu_mark) / max(1e-6, now - self.adapted_at)
        self.cpu_mark, self.adapted_at = cpu, now
        count, waited = self.stats.window()
        if not self.adaptive:
            return
        with self.slots:
            limit = self.limit
            if count and waited / count > 0.005 and used < 0.75:
                limit = min(self.size, 2 * limit)
            elif used > 0.9:
                limit = max(self.minimum, limit - max(1, limit // 8))
            if limit != self.limit:
                self.limit = limit
                self.slots.notify_all()

    def _round(self, ready: list[tuple[int, int]], wakeup_fd: int) -> None:
        """One round: ready sockets, then due deadlines, then queued calls."""
        woken = False
        for fd, events in ready:
            if fd == wakeup_fd:
                woken = True
                continue
            if not self.arming.direct:
                self.arming.one_shot(fd, wakeup_fd)  # type: ignore[union-attr]
            with self.lock:
                connection = self.parked.pop(fd, None)
                if connection is not None:
                    self.timer_of.pop(id(connection), None)
            if connection is not None:
                self._decide(connection, connection.on_ready, events)
        self._expire(time.monotonic())
        if woken:
            self.wakeup.drain()
            while True:
                try:
                    call = self.calls.get_nowait()
                except queue.Empty:
                    break
                with self.guard:
                    call()

    def _expire(self, now: float) -> None:
        due = []
        with self.lock:
            timers = self.timers
            while timers and timers[0][0] <= now:
                _, number, connection = heapq.heappop(timers)
                if self.timer_of.get(id(connection)) != number:
                    continue  # stale: the connection was woken, or parked again since
                del self.timer_of[id(connection)]
                try:
                    fd = connection.fileno()
                except (OSError, ValueError):
                    fd = -1
                if self.parked.get(fd) is connection:
                    del self.parked[fd]
                    self.arming.disarm(fd)
                due.append(connection)
        for connection in due:
            self._decide(connection, connection.on_deadline)

    def _decide(self, connection: Connection, callback: Callable[..., Verdict], *args: int) -> None:
        """Run one callback of a connection; a fault closes that connection only."""
        verdict = Verdict.CLOSE
        try:
            verdict = callback(*args)
        except Exception as error:
            self.guard.report(error)
        self.dispatch(connection, verdict)

    def _close(self, connection: Connection) -> None:
        try:
            connection.close()
        except Exception as error:
            self.guard.report(error)

    def _shut_down(self) -> None:
        with self.lock:
            parked = list(self.parked.values())
            self.parked.clear()
            self.timers.clear()
            self.timer_of.clear()
        for connection in parked:
            self._close(connection)
        self.arming.close()
        self.wakeup.close()

    # --- the pool ----------------------------------------------------------------------

    def _work(self) -> None:
        slots = self.slots
        try:
            while True:
                with slots:  # a place among the ``limit`` threads that serve
                    while self.active >= self.limit and not self.closing:
                        slots.wait()
                    self.active += 1
                try:
                    if self._serve():
                        break
                finally:
                    with slots:
                        self.active -= 1
                        slots.notify()
        finally:
            with self.lock:
                self.workers.remove(threading.current_thread())

    def _serve(self) -> bool:
        """Take connections off the queue while this thread keeps its place; True: end the thread."""
        stats = self.stats
        get = self.queue.get
        slots = self.slots
        while True:
            item = get()
            if item is None:
                with self.lock:
                    if self.stopping:
                        return True
                    if self.retiring:
                        self.retiring -= 1
                        return True
                continue
            connection, queued = item
            stats.observe(time.monotonic() - queued)
            try:
                connection.run()
            except Exception as error:
                self.pool_guard.report(error)
            finally:
                stats.done()
            with slots:
                if self.active > self.limit:
                    return False  # the limit went down: give the place up


# --- reading a request head without blocking -----------------------------------------

def head_ready(buffer: bytes | bytearray, max_line: int, max_header_bytes: int) -> bool:
    """Whether ``buffer`` holds enough for the request-head parser to finish without waiting.

    True for a complete head (request line, fields, empty line), and also
    as soon as the parser will refuse it: a request line longer than
    ``max_line`` (414), one not ended by CRLF (400), or a header section
    longer than ``max_header_bytes`` (431).  Mirrors
    ``ProxyHandler.parse_head``: one empty line before the request line is skipped.
    """
    start = 2 if buffer[:2] == b"\r\n" else 0
    end = buffer.find(b"\n", start, start + max_line + 3)
    if end < 0:
        return len(buffer) - start >= max_line + 3
    if buffer[end - 1:end] != b"\r":
        return True  # a bare LF: the parser answers 400 at once
    fields = end + 1
    if buffer[fields:fields + 2] == b"\r\n":
        return True  # no fields at all
    if buffer.find(b"\r\n\r\n", fields) >= 0:
        return True
    return len(buffer) - fields > max_header_bytes


NOTHING, EOF, FAILED = 0, -1, -2  # ``receive``'s results other than a byte count


def receive(sock: socket.socket, buffer: bytearray) -> tuple[int, int]:
    """Read what ``sock`` has now into ``buffer``, never blocking: (bytes or NOTHING/EOF/FAILED, interest).

    Plain sockets stay in blocking mode (kernel timeouts for the pool
    threads) and are read with ``MSG_DONTWAIT``; a TLS socket must be in
    non-blocking mode (``settimeout(0)``) and may want to write first
    (``interest`` WRITE).  Stops after a short read, or when the buffer
    passed ``RECV_SIZE`` bytes.
    """
    total = 0
    tls = isinstance(sock, ssl.SSLSocket)
    while True:
        try:
            data = sock.recv(RECV_SIZE) if tls else sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except ssl.SSLWantWriteError:
            return (total or NOTHING), WRITE
        except (BlockingIOError, ssl.SSLWantReadError):
            return (total or NOTHING), READ
        except OSError:
            return (total or FAILED), READ
        if not data:
            return (total or EOF), READ
        buffer += data
        total += len(data)
        if (len(data) < RECV_SIZE and not (tls and sock.pending())) or total >= RECV_SIZE:  # type: ignore[attr-defined]
            return total, READ


# --- the process's file descriptor limit -------------------------------------------------

def raise_fd_limit(wanted: int) -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``wanted`` (at most the hard limit).

    Returns (soft before, soft now, hard).  Each connection needs a
    descriptor, and a proxied one a second for its backend.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target, hard
        except (ValueError, OSError):  # not allowed here (a container's limit): keep it
            pass
    return soft, soft, hard


__all__ = ["EOF", "Engine", "FAILED", "NOTHING", "QueueStats", "READ", "Verdict", "WRITE",
           "head_ready", "raise_fd_limit", "receive"]
