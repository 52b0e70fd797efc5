"""The command line and the process life cycle of ``cclb.py``, run as a real process."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.support import (PYTHON, ROOT, Balancer, ChildProcess, RawBackend, accepts, child_pids,
                           free_port, http_request, read_body, wait_for)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import settings  # noqa: E402

CCLB = str(ROOT / "cclb.py")
SERVER = str(ROOT / "server.py")
READY = re.compile(r"^cclb listening on http://(?P<host>[^\s:]+):(?P<port>\d+) -> (?P<n>\d+) backends?$")


def run_cclb(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run cclb.py to completion (for argument and start-up errors)."""
    return subprocess.run([PYTHON, CCLB, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_many(argvs: list[tuple[str, ...]], timeout: float = 20.0) -> list[subprocess.CompletedProcess[str]]:
    """Run several cclb.py invocations in parallel (each only parses arguments)."""
    procs = [subprocess.Popen([PYTHON, CCLB, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    results = []
    try:
        for argv, proc in zip(argvs, procs):
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def demo_server_processes(ports) -> list[tuple[int, list[str]]]:
    """Running ``server.py PORT`` processes of this checkout, for any PORT of ``ports``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
        except OSError:
            continue
        if SERVER in argv and any(str(port) in argv for port in ports) and alive(int(entry)):
            found.append((int(entry), argv))
    return found


def distinct_free_ports(count: int) -> list[int]:
    """``count`` different ports that were free a moment ago."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def blocked_opening_a_fifo(pid: int) -> bool:
    """Whether a thread of ``pid`` waits in open() for the other end of a FIFO."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/wchan") as handle:
                if handle.read().strip() in ("wait_for_partner", "fifo_open"):
                    return True
        except OSError:
            continue
    return False


def read_text(path: str) -> str:
    """The file's text, or "" while it does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_demo_leftovers(ports) -> None:
    """Cleanup: SIGKILL demo servers of this checkout on ``ports`` that survived; wait until gone."""
    kill_pids(pid for pid, _ in demo_server_processes(ports))
    wait_for(lambda: not demo_server_processes(ports), 5, message="leftover demo servers to die")


class ArgumentTests(unittest.TestCase):

    def assert_usage_error(self, result: subprocess.CompletedProcess[str], *needles: str) -> None:
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertTrue(result.stderr.strip(), "no message on stderr")
        for needle in needles:
            self.assertIn(needle, result.stderr)
        self.assertNotIn("listening", result.stdout)

    def test_help_exits_0_and_documents_every_option_with_defaults(self):
        """--help lists every flag of settings.SETTINGS, each with its default."""
        result = run_cclb("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        text = result.stdout
        entries: list[str] = []  # one per option: its help lines joined
        for line in text.splitlines():
            if re.match(r"^  -", line):
                entries.append(line)
            elif entries and re.match(r"^\s{3,}\S", line):
                entries[-1] += " " + line.strip()
        for setting in settings.SETTINGS:
            for flag in setting.flags:
                self.assertRegex(text, rf"(?<![\w-]){re.escape(flag)}(?![\w-])", f"{flag} missing from --help")
            if setting.flag_only or setting.default is None:
                continue
            entry = next((e for e in entries
                          if re.match(rf"^\s+(?:\S+ \S+, )?{re.escape(setting.flags[0])}\b", e)), None)
            self.assertIsNotNone(entry, f"no help entry for {setting.flags[0]}")
            self.assertIn("(default:", entry, f"{setting.flags[0]} help does not show its default")
        collapsed = " ".join(text.split())
        for expected in ("(default: 8080)", "(default: /)", "(default: INFO)", "(default: -)"):
            self.assertIn(expected, collapsed)

    def test_invalid_backend_urls_exit_2_with_message(self):
        """-b with a bad port, a non-http scheme or no port: exit 2, message naming it, no traceback."""
        values = ("http://x:99999", "ftp://h:1", "nohost", "http://h:0", "http://h:abc")
        results = run_many([("-p", "0", "--health-interval", "0", "-b", value) for value in values])
        for value, result in zip(values, results):
            with self.subTest(backend=value):
                self.assert_usage_error(result, value)

    def test_bad_numeric_options_exit_2(self):
        """Non-numeric or out-of-range numbers are usage errors (exit 2), not tracebacks."""
        cases = [("--health-interval", "abc"), ("--health-interval", "-1"), ("-p", "70000"),
                 ("-p", "http"), ("--health-timeout", "0"), ("--health-interval", "nan")]
        for args, result in zip(cases, run_many(cases)):
            with self.subTest(args=args):
                self.assert_usage_error(result, args[0])

    def test_port_in_use_exits_1_with_clear_message(self):
        """Another socket listens on the port: exit 1, 'in use' on stderr, no traceback."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            result = run_cclb("-p", str(port), "--host", "127.0.0.1", "-b", "127.0.0.1:1",
                              "--health-interval", "0")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn(str(port), result.stderr)
        self.assertIn("in use", result.stderr.lower())
        self.assertNotIn("listening on", result.stdout)

    def test_duplicate_or_invalid_backends_on_the_command_line_exit_2(self):
        """A backend given twice (in any spelling), or a host with a space or '-': exit 2 (a review fix)."""
        runs = {
            "duplicate": (["-b", "127.0.0.1:7000", "-b", "http://127.0.0.1:7000/"],
                          ["http://127.0.0.1:7000", "twice"]),
            "space": (["-b", "a b:1"], ["a b"]),
            "dash": (["--backend=-:1"], ["'-'"]),  # "-b -:1" would be an argparse error
        }
        results = run_many([("-p", "0", "--host", "127.0.0.1", "--health-interval", "0",
                             "--access-log", "off", *args) for args, _ in runs.values()])
        for (args, words), result in zip(runs.values(), results):
            with self.subTest(backends=args):
                self.assert_usage_error(result, *words)


class LifecycleTests(unittest.TestCase):

    def start_balancer(self, backends, *extra: str) -> Balancer:
        balancer = Balancer(backends, *extra)
        self.addCleanup(balancer.kill)
        return balancer

    def test_ready_line_format_and_port_accepts_at_once(self):
        """Ready line is 'cclb listening on http://HOST:PORT -> N backends' and PORT accepts right away."""
        balancer = self.start_balancer([free_port(), free_port()], "--health-interval", "0")
        lines = [line.rstrip("\n") for line in balancer.stdout]
        ready = [line for line in lines if "listening" in line]
        self.assertEqual(len(ready), 1, lines)
        match = READY.match(ready[0])
        self.assertIsNotNone(match, ready[0])
        self.assertEqual((match["host"], int(match["port"]), match["n"]),
                         ("127.0.0.1", balancer.port, "2"))
        self.assertTrue(accepts(balancer.port))

    def test_sigterm_lets_in_flight_request_finish_then_exits_0(self):
        """SIGTERM during a slow request: the client still gets its 200, then exit code 0."""
        arrived, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        result: dict[str, object] = {}

        def slow(head, conn, reader):
            read_body(head, reader)
            arrived.set()
            release.wait(10)
            # The behaviour under test: a backend still busy well into the balancer's drain.
            time.sleep(0.5)
            result["alive_before_answer"] = balancer.proc.poll() is None
            body = b"slow but complete"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            return True

        backend = RawBackend(slow)
        self.addCleanup(backend.stop)
        balancer = self.start_balancer([backend.port], "--health-interval", "0")
        # An idle keep-alive client: the balancer closes it once it starts draining.
        idle = socket.create_connection(("127.0.0.1", balancer.port), timeout=10)
        self.addCleanup(idle.close)

        def client():
            try:
                result["response"] = http_request(balancer.port, path="/slow")
            except Exception as error:  # noqa: BLE001 - asserted below
                result["error"] = repr(error)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        self.assertTrue(arrived.wait(10), "request never reached the backend")
        balancer.signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in balancer.log_text(), 5, message="the balancer to start stopping")
        idle.settimeout(2)
        try:  # wait (bounded) until draining has begun: the idle connection is closed
            idle.recv(1)
        except OSError:
            pass
        self.assertIsNone(balancer.proc.poll(), "exited with a request in flight")
        release.set()
        thread.join(10)
        self.assertNotIn("error", result)
        status, _, body = result["response"]
        self.assertEqual((status, body), (200, b"slow but complete"))
        self.assertTrue(result["alive_before_answer"])
        self.assertEqual(balancer.proc.wait(10), 0)
        balancer.kill()  # joins the output readers
        self.assertNotIn("Traceback", balancer.log_text())

    def slow_backend(self) -> tuple[RawBackend, threading.Event, threading.Event]:
        """A backend that holds each request until ``release`` is set; ``arrived`` when one came."""
        arrived, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def slow(head, conn, reader):
            read_body(head, reader)
            arrived.set()
            release.wait(20)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            return True
        backend = RawBackend(slow)
        self.addCleanup(backend.stop)
        return backend, arrived, release

    def test_sigterm_stops_accepting_at_once_while_in_flight_requests_finish(self):
        """Regression: the listener stayed open during the drain, so a client connecting after
        SIGTERM waited in the backlog and got a reset seconds later.  Now it is refused at
        once, keep-alive answers say Connection: close, and the in-flight request completes."""
        backend, arrived, release = self.slow_backend()
        balancer = self.start_balancer([backend.port], "--health-interval", "0")
        result: dict[str, object] = {}

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=20)
            try:
                conn.request("GET", "/slow")
                response = conn.getresponse()
                result["response"] = (response.status, response.getheader("Connection"),
                                      response.read())
            except Exception as error:  # noqa: BLE001 - asserted below
                result["error"] = repr(error)
            finally:
                conn.close()
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        self.assertTrue(arrived.wait(10), "request never reached the backend")
        balancer.signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in balancer.log_text(), 5, message="the drain to start")

        def refused() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", balancer.port), timeout=1) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    return sock.recv(1) == b""  # accepted from a dying backlog: reset/closed
            except TimeoutError:
                return False  # waiting in a backlog nobody accepts from: the old behaviour
            except OSError:
                return True  # refused or reset
        started = time.monotonic()
        wait_for(refused, 3, message="new connections to be refused")
        self.assertLess(time.monotonic() - started, 3)
        self.assertIsNone(balancer.proc.poll(), "exited with a request in flight")
        release.set()
        thread.join(10)
        self.assertNotIn("error", result)
        self.assertEqual(result["response"], (200, "close", b"done"))
        self.assertEqual(balancer.proc.wait(10), 0)
        balancer.kill()
        self.assertNotIn("Traceback", balancer.log_text())

    def test_a_second_sigterm_stops_at_once(self):
        """During the drain, a second SIGTERM (or SIGINT) ends the process without waiting."""
        for second in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(second=second.name):
                backend, arrived, release = self.slow_backend()
                balancer = self.start_balancer([backend.port], "--health-interval", "0")
                thread = threading.Thread(target=lambda: self.swallow(http_request, balancer.port),
                                          daemon=True)
                thread.start()
                self.assertTrue(arrived.wait(10), "request never reached the backend")
                balancer.signal(signal.SIGTERM)
                wait_for(lambda: "stopping" in balancer.log_text(), 5, message="the drain")
                started = time.monotonic()
                balancer.signal(second)
                self.assertEqual(balancer.proc.wait(10), 0)
                # The drain would have waited for the held request (released only at cleanup).
                self.assertLess(time.monotonic() - started, 3)
                self.assertFalse(release.is_set())
                balancer.kill()
                log = balancer.log_text()
                self.assertIn("stopping at once", log)
                self.assertNotIn("Traceback", log)
                release.set()
                thread.join(10)

    @staticmethod
    def swallow(function, *args) -> None:
        try:
            function(*args)
        except OSError:
            pass  # cut off by the immediate stop: expected

    def test_a_hup_storm_during_atomic_config_replacements_costs_no_request(self):
        """The README's advice (write a temporary file, then rename it over the config) holds:
        a burst of SIGHUPs while the file is replaced again and again fails no request.
        Empty and backend-less files are refused on reload, keeping the old backends."""
        backends = [RawBackend() for _ in range(3)]
        for backend in backends:
            self.addCleanup(backend.stop)
        urls = [f"127.0.0.1:{backend.port}" for backend in backends]
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "cclb.toml")

        def write_atomically(text: str) -> None:
            temporary = path + ".tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temporary, path)

        def config(members: list[str]) -> str:
            listed = ", ".join(f'"{member}"' for member in members)
            return f'backends = [{listed}]\nhealth_interval = 0\naccess_log = "off"\n'
        write_atomically(config(urls[:2]))
        balancer = Balancer([], "--config", path)
        self.addCleanup(balancer.kill)
        failures: list[str] = []
        done = threading.Event()
        counts = [0]

        def traffic() -> None:
            while not done.is_set():
                try:
                    status, _, _ = http_request(balancer.port, path="/storm", timeout=5)
                    if status != 200:
                        failures.append(str(status))
                except OSError as error:
                    failures.append(repr(error))
                counts[0] += 1
        clients = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
        for client in clients:
            client.start()
        sets = [urls[:2], urls[1:], [urls[0], urls[2]], urls]
        for round_number in range(40):
            write_atomically(config(sets[round_number % len(sets)]))
            balancer.signal(signal.SIGHUP)
            if round_number % 10 == 9:  # refused on reload: the old backends stay
                write_atomically("# an empty file\n")
                balancer.signal(signal.SIGHUP)
                write_atomically('port = 1\n')
                balancer.signal(signal.SIGHUP)
            wait_for(lambda: counts[0] > round_number * 5, 10, message="traffic between reloads")
        done.set()
        for client in clients:
            client.join(10)
        self.assertEqual(failures, [], f"{len(failures)} of {counts[0]} requests failed")
        self.assertGreater(counts[0], 39 * 5)  # traffic flowed between every two reloads
        wait_for(lambda: "no backends" in balancer.log_text(), 5, message="the refusal logged")
        self.assertEqual(balancer.stop(), 0)
        self.assertNotIn("Traceback", balancer.log_text())

    def test_sigint_exits_0(self):
        """Ctrl-C (SIGINT) stops the balancer with exit code 0 and no traceback."""
        balancer = self.start_balancer([free_port()], "--health-interval", "0")
        balancer.signal(signal.SIGINT)
        self.assertEqual(balancer.proc.wait(10), 0)
        balancer.kill()
        self.assertNotIn("Traceback", balancer.log_text())
        self.assertFalse(accepts(balancer.port))

    def test_sighup_before_the_handlers_are_installed_does_not_kill(self):
        """A SIGHUP during start-up is ignored (a review fix).

        The access log is a FIFO: opening it blocks cclb mid-startup (after its
        listener is bound, before its signal handlers exist) until a reader comes.
        That is where the SIGHUP is sent.  (Right after spawning would be too early:
        no Python program can ignore a signal before the interpreter runs it.)
        """
        backend = RawBackend()
        self.addCleanup(backend.stop)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        fifo = os.path.join(directory.name, "access.fifo")
        os.mkfifo(fifo)
        port = free_port()
        child = ChildProcess([PYTHON, CCLB, "-p", str(port), "--host", "127.0.0.1",
                              "-b", f"127.0.0.1:{backend.port}", "--health-interval", "0",
                              "--access-log", fifo])
        self.addCleanup(child.kill)
        wait_for(lambda: blocked_opening_a_fifo(child.pid) or child.proc.poll() is not None, 10,
                 message="cclb to block opening the access-log FIFO")
        self.assertIsNone(child.proc.poll(), child.log_text())
        self.assertTrue(accepts(port), "the listener is not bound yet")
        self.assertEqual(child.stdout, [], "started before the access log was opened?")

        # A fatal signal takes effect when it is sent: no wait is needed before
        # letting cclb's open() return.
        child.signal(signal.SIGHUP)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets cclb's open() go on
        stop_draining = threading.Event()
        self.addCleanup(os.close, reader)
        self.addCleanup(stop_draining.set)

        def drain() -> None:
            while not stop_draining.is_set():
                try:
                    if not os.read(reader, 65536):
                        stop_draining.wait(0.05)  # polling interval of a non-blocking read
                except BlockingIOError:
                    stop_draining.wait(0.05)
                except OSError:
                    return
        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        self.addCleanup(drainer.join, 2)

        match = child.wait_line(r"listening on http://[^:]+:(\d+)", 10)
        self.assertEqual(int(match[1]), port)
        code, _, body = http_request(port, path="/after-sighup")
        self.assertEqual(code, 200, body[:200])
        self.assertEqual(child.stop(), 0, child.log_text()[-1500:])


class OperatorTests(unittest.TestCase):
    """What an operator drives: --version, --check, SIGUSR1, --drain-timeout, systemd."""

    def start_balancer(self, backends, *extra: str) -> Balancer:
        balancer = Balancer(backends, *extra)
        self.addCleanup(balancer.kill)
        return balancer

    def tempdir(self) -> str:
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        return folder

    def test_version_prints_cclb_and_python_versions(self):
        result = run_cclb("--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.strip(), r"^cclb \d+\.\d+\.\d+ \(Python 3\.\d+\.\d+\)$")

    def test_check_prints_a_summary_and_exits_0_or_2_with_the_error(self):
        folder = self.tempdir()
        path = os.path.join(folder, "cclb.toml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write('backends = ["127.0.0.1:7100,weight=3", "127.0.0.1:7101"]\n'
                         'algorithm = "least-connections"\nport = 9999\n')
        for flag in ("--check", "-t"):
            with self.subTest(flag=flag):
                result = run_cclb(flag, "--config", path)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("configuration OK", result.stdout)
                self.assertIn("least-connections, 2 backends", result.stdout)
                self.assertIn("http://127.0.0.1:7100 weight 3", result.stdout)
                self.assertIn(":9999", result.stdout)
                self.assertFalse(accepts(9999), "--check must not start serving")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write('port = 9999\n')
        result = run_cclb("--check", "--config", path)
        self.assertEqual(result.returncode, 2)
        self.assertIn("no backends", result.stderr)
        result = run_cclb("-t", "--access-log", os.path.join(folder, "missing", "access.log"))
        self.assertEqual((result.returncode, "cannot open access log" in result.stderr), (2, True))
        self.assertNotIn("Traceback", result.stderr)

    def test_sigusr1_reopens_the_access_log_without_reloading(self):
        """logrotate's move-then-signal: new lines go to a new file at the old path, and a
        config file edited meanwhile is NOT applied (only SIGHUP reloads)."""
        backend = RawBackend()
        self.addCleanup(backend.stop)
        folder = self.tempdir()
        log_path, config_path = os.path.join(folder, "access.log"), os.path.join(folder, "cclb.toml")
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(f'backends = ["127.0.0.1:{backend.port}"]\nhealth_interval = 0\n'
                         f'access_log = "{log_path}"\n')
        balancer = self.start_balancer([], "--config", config_path)
        self.assertEqual(http_request(balancer.port, path="/before")[0], 200)
        wait_for(lambda: "/before" in read_text(log_path), 5, message="the first line")
        os.rename(log_path, log_path + ".1")
        with open(config_path, "w", encoding="utf-8") as handle:  # not to be applied
            handle.write('backends = ["127.0.0.1:1"]\nhealth_interval = 0\n'
                         f'access_log = "{log_path}"\n')
        balancer.signal(signal.SIGUSR1)
        wait_for(lambda: "log files reopened" in balancer.log_text(), 5, message="the reopen")
        self.assertEqual(http_request(balancer.port, path="/after")[0], 200, "config was reloaded")
        wait_for(lambda: "/after" in read_text(log_path), 5, message="the line in the new file")
        self.assertNotIn("/after", read_text(log_path + ".1"))
        self.assertNotIn("reloaded", balancer.log_text())
        self.assertEqual(balancer.stop(), 0)

    def test_drain_timeout_bounds_the_wait_for_requests_in_flight(self):
        held = threading.Event()
        self.addCleanup(held.set)

        def hold(head, conn, reader):
            read_body(head, reader)
            held.wait(30)
            return False
        backend = RawBackend(hold)
        self.addCleanup(backend.stop)
        balancer = self.start_balancer([backend.port], "--health-interval", "0",
                                       "--drain-timeout", "0.5")
        thread = threading.Thread(target=LifecycleTests.swallow,
                                  args=(http_request, balancer.port), daemon=True)
        thread.start()
        wait_for(lambda: backend.heads, 5, message="the request to arrive")
        started = time.monotonic()
        balancer.signal(signal.SIGTERM)
        self.assertEqual(balancer.proc.wait(10), 0)
        self.assertLess(time.monotonic() - started, 4, "waited past --drain-timeout")
        balancer.kill()
        self.assertIn("gave up waiting for in-flight requests after 0.5s", balancer.log_text())

    def test_systemd_notifications_and_journal_priorities(self):
        """Under systemd (fake NOTIFY_SOCKET, JOURNAL_STREAM naming our stderr): READY=1 once
        listening, RELOADING=1 then READY=1 around a reload, STOPPING=1; <N> log prefixes."""
        folder = self.tempdir()
        address = os.path.join(folder, "notify.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        listener.bind(address)
        listener.settimeout(10)
        stderr_path = os.path.join(folder, "stderr.log")
        stderr_file = open(stderr_path, "w+b")
        self.addCleanup(stderr_file.close)
        status = os.fstat(stderr_file.fileno())
        env = dict(os.environ, NOTIFY_SOCKET=address,
                   JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}")
        proc = subprocess.Popen([PYTHON, CCLB, "-p", "0", "--host", "127.0.0.1", "-b",
                                 f"127.0.0.1:{free_port()}", "--health-interval", "0"],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr_file)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        messages = [listener.recv(4096).decode()]
        self.assertIn("READY=1", messages[0].split("\n"))
        proc.send_signal(signal.SIGHUP)
        messages.append(listener.recv(4096).decode())
        messages.append(listener.recv(4096).decode())
        self.assertIn("RELOADING=1", messages[1].split("\n"))
        self.assertRegex(messages[1], r"MONOTONIC_USEC=\d+")
        self.assertIn("READY=1", messages[2].split("\n"))
        proc.send_signal(signal.SIGTERM)
        messages.append(listener.recv(4096).decode())
        self.assertEqual(messages[3], "STOPPING=1")
        self.assertEqual(proc.wait(10), 0)
        stderr_file.seek(0)
        lines = stderr_file.read().decode().splitlines()
        self.assertTrue(lines)
        self.assertTrue(all(re.match(r"^<[0-7]>[A-Z]+ ", line) for line in lines), lines)
        self.assertTrue(any(line.startswith("<4>WARNING configuration reloaded") for line in lines),
                        lines)


class DemoTests(unittest.TestCase):
    """--demo on free ports: $CCLB_DEMO_PORTS moves the three server.py children, and
    matching -b options point the balancer at them (so these tests never skip)."""

    def setUp(self) -> None:
        self.ports = distinct_free_ports(3)
        # Cleanups run last-in first-out: this one runs after the test's own.
        self.addCleanup(kill_demo_leftovers, self.ports)

    def demo_args(self, *extra: str) -> list[str]:
        """The cclb.py command line for --demo on ``self.ports``."""
        args = [PYTHON, CCLB, "--demo", *extra, "--host", "127.0.0.1", "--health-interval", "0"]
        for port in self.ports:
            args += ["-b", f"127.0.0.1:{port}"]
        return args

    def demo_env(self) -> dict[str, str]:
        return {**os.environ, "CCLB_DEMO_PORTS": ",".join(map(str, self.ports))}

    def run_failing_demo(self, *extra: str, deadline: float = 20.0
                         ) -> tuple[subprocess.Popen[str], set[int], str]:
        """Run a --demo start that must fail: (process, every child seen, stderr)."""
        # Output goes to files, not pipes: a surviving child would keep a pipe open.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.addCleanup(out.close)
        self.addCleanup(err.close)
        proc = subprocess.Popen(self.demo_args(*extra), cwd=ROOT, env=self.demo_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True)
        self.addCleanup(lambda: proc.poll() is None and (proc.terminate(), proc.wait(10)))
        seen: set[int] = set()

        def record_children_until_exit() -> bool:
            seen.update(child_pids(proc.pid))
            return proc.poll() is not None
        try:
            wait_for(record_children_until_exit, deadline, interval=0.01,
                     message="cclb --demo to exit after a failed start")
        except AssertionError:
            pass  # asserted below, with the output
        err.seek(0)
        return proc, seen, err.read()

    def assert_no_demo_left(self, children: set[int] | list[int]) -> None:
        self.assertEqual([pid for pid in children if alive(pid)], [], "demo children left running")
        self.assertEqual(demo_server_processes(self.ports), [])

    def test_demo_starts_three_backends_and_stops_them_on_sigterm(self):
        """--demo: server-P1/2/3 answer through the balancer; after SIGTERM: exit 0, no child, ports free."""
        balancer = ChildProcess(self.demo_args("-p", "0"), env=self.demo_env())
        # SIGTERM, not SIGKILL: a killed balancer could not stop its children.
        self.addCleanup(balancer.stop)
        match = balancer.wait_line(r"listening on http://[^:]+:(\d+) -> 3 backends", 15)
        port = int(match[1])
        children = wait_for(lambda: (lambda pids: pids if len(pids) >= 3 else None)(
            child_pids(balancer.pid)), 5, message="three demo children")
        self.assertEqual(len(children), 3, children)
        names = set()
        for _ in range(6):
            status, headers, _ = http_request(port)
            self.assertEqual(status, 200)
            names.add(headers["X-Backend-Server"])
        self.assertEqual(names, {f"server-{demo_port}" for demo_port in self.ports})

        balancer.signal(signal.SIGTERM)
        self.assertEqual(balancer.proc.wait(15), 0, balancer.log_text())
        balancer.kill()
        self.assertNotIn("Traceback", balancer.log_text())
        self.assert_no_demo_left(children)
        self.assertEqual([p for p in self.ports if accepts(p)], [], "demo ports still answer")

    def test_demo_with_own_port_taken_exits_1_and_leaves_no_children(self):
        """--demo when the balancer's port is in use: exit 1, message, and no demo backend survives."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            proc, seen, stderr = self.run_failing_demo("-p", str(port))
        self.assertIsNotNone(proc.poll(), "cclb --demo still running 20 s after a failed start")
        self.assertEqual(proc.returncode, 1, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertIn(str(port), stderr)
        self.assertIn("in use", stderr.lower())
        self.assert_no_demo_left(seen)
        self.assertEqual([p for p in self.ports if accepts(p)], [], "demo ports still answer")

    def test_demo_with_a_backend_port_taken_exits_1_and_leaves_no_children(self):
        """--demo when one demo port is in use (this test listens on it): exit 1, a message
        naming the port, no traceback, and the other demo backends do not survive."""
        with socket.create_server(("127.0.0.1", self.ports[1])):
            proc, seen, stderr = self.run_failing_demo("-p", "0", deadline=10)
            self.assertIsNotNone(proc.poll(), "cclb --demo still running 10 s after a failed start: "
                                              f"{stderr[-1000:]}")
        self.assertEqual(proc.returncode, 1, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertIn(str(self.ports[1]), stderr)
        self.assertIn("in use", stderr.lower())
        self.assert_no_demo_left(seen)
        others = [self.ports[0], self.ports[2]]
        self.assertEqual([p for p in others if accepts(p)], [], "demo ports still answer")

if __name__ == "__main__":
    unittest.main()
