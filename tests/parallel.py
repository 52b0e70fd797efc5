"""Run the discovered suite in a few worker processes, one test class at a time.

Most of the suite waits on real sockets and real processes (deadlines, health-check rounds,
drain periods), so two cores can run several test classes at once. `tests/__init__.py` hands
the whole discovered suite to `ParallelSuite` when the package is discovered (the README's
command); `python3 -m unittest tests.test_x` still runs in-process as before.

How it works: the parent keeps the loaded test objects and a queue of units (the selected
tests of one class). Each worker (`python3 -m tests.parallel`) reads a unit's test ids on a
pipe, runs them as one suite (so setUpClass/tearDownClass and module fixtures run as usual),
and writes one JSON line per outcome on a private pipe, then a `done` line. The parent reports
every outcome into the runner's own result object, so `-v` output, failures and the exit
status read as in a serial run. A test that no worker reported (a worker that died) is an
error, never a silent pass.

`CCLB_TEST_JOBS=1` runs the suite serially in one process, as plain unittest does.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import traceback
import unittest
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

JOBS_ENV = "CCLB_TEST_JOBS"
WORKER_ENV = "CCLB_TEST_WORKER"  # set in workers: their own discovery stays serial
UNITS_FD_ENV = "CCLB_TEST_UNITS_FD"  # a worker reads units here (its stdin stays free for tests)
RESULTS_FD_ENV = "CCLB_TEST_RESULTS_FD"  # and writes outcomes here (its stdout stays free)
TOP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jobs_wanted() -> int:
    """Worker processes to use: $CCLB_TEST_JOBS, else 3 (the suite mostly waits on I/O)."""
    if os.environ.get(WORKER_ENV):
        return 1
    text = os.environ.get(JOBS_ENV, "").strip()
    try:
        return max(1, int(text)) if text else 3
    except ValueError:
        return 1


def iter_tests(suite: unittest.TestSuite | unittest.TestCase) -> Iterator[unittest.TestCase]:
    if isinstance(suite, unittest.TestSuite):
        for item in suite:
            yield from iter_tests(item)
    else:
        yield suite


def runs_in_worker(test: unittest.TestCase) -> bool:
    """A test a worker can load by its id (not a loader's stand-in for a module that failed to import)."""
    module = type(test).__module__
    return (isinstance(test, unittest.TestCase) and not module.startswith(("unittest", "doctest"))
            and test.id().startswith(module + "."))


class RemoteTraceback(Exception):
    """A failure or error raised in a worker process; its text is the worker's traceback."""


def remote_error(text: str) -> Any:  # an exc_info triple without a local traceback
    return RemoteTraceback, RemoteTraceback("\n" + text), None


@dataclass
class Unit:
    """The selected tests of one class, run together in one worker."""
    name: str
    test_ids: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    test_id: str
    kind: str  # success, failure, error, skip, expected_failure, unexpected_success, not_run
    detail: str = ""
    started: bool = True  # the worker's result saw startTest for it


class ParallelSuite(unittest.TestSuite):
    """A suite that runs its test classes in worker processes and reports into one result."""

    def __init__(self, tests: unittest.TestSuite, jobs: int) -> None:
        super().__init__([tests])
        self.jobs = jobs

    def run(self, result: unittest.TestResult, debug: bool = False) -> unittest.TestResult:
        tests: dict[str, unittest.TestCase] = {}
        units: dict[str, Unit] = {}
        local: list[unittest.TestCase] = []  # import failures and the like run here
        for test in iter_tests(self._tests[0]):  # type: ignore[arg-type]
            if runs_in_worker(test):
                tests[test.id()] = test
                name = f"{type(test).__module__}.{type(test).__qualname__}"
                units.setdefault(name, Unit(name)).test_ids.append(test.id())
            else:
                local.append(test)
        for test in local:
            test(result)
        work: queue.SimpleQueue[Unit | None] = queue.SimpleQueue()
        for unit in units.values():
            work.put(unit)
        jobs = min(self.jobs, len(units))
        for _ in range(jobs):
            work.put(None)
        outcomes: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        stop = threading.Event()
        threads = [threading.Thread(target=feed_worker, args=(work, outcomes, stop), daemon=True,
                                    name=f"test-worker-{n}") for n in range(jobs)]
        for thread in threads:
            thread.start()
        reported: set[str] = set()
        running = jobs
        try:
            while running:
                outcome = outcomes.get()
                if outcome is None:
                    running -= 1
                    continue
                if outcome.kind != "not_run":  # e.g. its class's setUpClass failed, reported once
                    report(result, tests, outcome)
                reported.add(outcome.test_id)
                if result.shouldStop:
                    stop.set()
        except KeyboardInterrupt:
            stop.set()
            raise
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
        if not result.shouldStop:  # a safety net: every selected test ends up reported
            for test_id in tests:
                if test_id not in reported:
                    report(result, tests, Outcome(test_id, "error",
                                                  "no worker reported this test (a worker died?)"))
        return result


def report(result: unittest.TestResult, tests: dict[str, unittest.TestCase], outcome: Outcome) -> None:
    """Replay one worker outcome into the runner's result, as if the test ran here."""
    test: Any = tests.get(outcome.test_id)
    if test is None:  # a class or module fixture's error: unittest reports it under its own name
        test = unittest.suite._ErrorHolder(outcome.test_id)  # type: ignore[attr-defined]
        result.addError(test, remote_error(outcome.detail))
        return
    if outcome.kind == "skip" and not outcome.started:  # 3.12+: a skipped class/method never starts
        result.addSkip(test, outcome.detail)
        return
    result.startTest(test)
    if outcome.kind == "success":
        result.addSuccess(test)
    elif outcome.kind == "failure":
        result.addFailure(test, remote_error(outcome.detail))
    elif outcome.kind == "skip":
        result.addSkip(test, outcome.detail)
    elif outcome.kind == "expected_failure":
        result.addExpectedFailure(test, remote_error(outcome.detail))
    elif outcome.kind == "unexpected_success":
        result.addUnexpectedSuccess(test)
    else:
        result.addError(test, remote_error(outcome.detail))
    result.stopTest(test)


def feed_worker(work: queue.SimpleQueue[Unit | None], outcomes: queue.SimpleQueue[Outcome | None],
                stop: threading.Event) -> None:
    """Feed units to one worker process at a time.

    A test that kills its worker is reported as an error; the rest of its unit runs on in a
    new worker, as it would have in a serial run that survived.
    """
    worker: Worker | None = None
    try:
        while not stop.is_set():
            unit = work.get()
            if unit is None:
                break
            while unit.test_ids and not stop.is_set():
                if worker is None:
                    worker = Worker()
                if worker.run(unit, outcomes):
                    break
                killer = worker.running or unit.test_ids[0]
                code = worker.close()
                worker = None
                outcomes.put(Outcome(killer, "error", f"the worker process running this test "
                                     f"ended with code {code}"))
                unit.test_ids = [test_id for test_id in unit.test_ids if test_id != killer]
    finally:
        if worker is not None:
            worker.close()
        outcomes.put(None)


class Worker:
    """One `python3 -m tests.parallel` process: units in on one pipe, outcomes out on another."""

    def __init__(self) -> None:
        units_read, units_write = os.pipe()
        results_read, results_write = os.pipe()
        env = dict(os.environ, **{WORKER_ENV: "1", UNITS_FD_ENV: str(units_read),
                                  RESULTS_FD_ENV: str(results_write)})
        self.process = subprocess.Popen([sys.executable, "-m", "tests.parallel"], cwd=TOP_DIR, env=env,
                                        stdin=subprocess.DEVNULL, pass_fds=(units_read, results_write))
        os.close(units_read)
        os.close(results_write)
        self.units = os.fdopen(units_write, "w", encoding="utf-8")
        self.results = os.fdopen(results_read, "r", encoding="utf-8")
        self.running: str | None = None  # the test started and not yet reported

    def run(self, unit: Unit, outcomes: queue.SimpleQueue[Outcome | None]) -> bool:
        """Run one unit. False when the worker died first: `unit.test_ids` is then what is left."""
        try:
            self.units.write(json.dumps(unit.test_ids) + "\n")
            self.units.flush()
        except OSError:
            return False
        pending = list(unit.test_ids)
        for line in self.results:
            record = json.loads(line)
            if record.get("done"):
                for test_id in pending:  # not run, and not a failure (a fixture error said why)
                    outcomes.put(Outcome(test_id, "not_run"))
                return True
            if record["kind"] == "started":
                self.running = record["test_id"]
                continue
            self.running = None
            if record["test_id"] in pending:
                pending.remove(record["test_id"])
            outcomes.put(Outcome(record["test_id"], record["kind"], record.get("detail", ""),
                                 record.get("started", True)))
        unit.test_ids = pending
        return False

    def close(self) -> int:
        try:
            self.units.close()
        except OSError:
            pass
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.results.close()
        return code


def describe(err: Any) -> str:
    """The traceback text of an exc_info triple."""
    return "".join(traceback.format_exception(*err))


class RecordingResult(unittest.TestResult):
    """A worker's result: each outcome becomes one JSON line on the parent's pipe."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out
        self.failed_subtests: list[str] = []  # of the running test, reported with it at its end
        self.running: str | None = None  # the id of the test between startTest and stopTest

    def emit(self, test: Any, kind: str, detail: str = "") -> None:
        self.out.write(json.dumps({"test_id": test.id(), "kind": kind, "detail": detail,
                                   "started": self.running == test.id()}) + "\n")
        self.out.flush()

    def startTest(self, test: Any) -> None:
        super().startTest(test)
        self.running = test.id()
        self.emit(test, "started")

    def addSuccess(self, test: Any) -> None:
        self.emit(test, "success")

    def addFailure(self, test: Any, err: Any) -> None:
        self.emit(test, "failure", describe(err))

    def addError(self, test: Any, err: Any) -> None:
        self.emit(test, "error", describe(err))

    def addSkip(self, test: Any, reason: str) -> None:
        self.emit(test, "skip", reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        self.emit(test, "expected_failure", describe(err))

    def addUnexpectedSuccess(self, test: Any) -> None:
        self.emit(test, "unexpected_success")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        if err is not None:  # a failing subtest fails its test
            self.failed_subtests.append(f"{subtest}\n{describe(err)}")

    def stopTest(self, test: Any) -> None:
        if self.failed_subtests:
            self.emit(test, "failure", "\n".join(self.failed_subtests))
            self.failed_subtests = []
        self.running = None
        super().stopTest(test)


def worker_main() -> None:
    """Run the units the parent sends until it closes the pipe."""
    units_fd, results_fd = int(os.environ[UNITS_FD_ENV]), int(os.environ[RESULTS_FD_ENV])
    for fd in (units_fd, results_fd):
        os.set_inheritable(fd, False)  # the processes tests start must not hold them
    out = os.fdopen(results_fd, "w", encoding="utf-8")
    loader = unittest.TestLoader()
    for line in os.fdopen(units_fd, "r", encoding="utf-8"):
        suite = unittest.TestSuite(loader.loadTestsFromName(test_id) for test_id in json.loads(line))
        suite.run(RecordingResult(out))
        out.write(json.dumps({"done": True}) + "\n")
        out.flush()


if __name__ == "__main__":
    worker_main()
