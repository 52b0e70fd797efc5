"""The parallel test runner (tests/parallel.py) reports every outcome a serial run would.

A runner that loses a failure would make the whole suite meaningless, so these tests run a
scratch package of deliberately failing tests through it, in a real child interpreter, and
compare what it reports with what plain serial unittest reports for the same package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import unittest

from tests.parallel import TOP_DIR

SCRATCH_TESTS = '''
import os
import unittest


class Outcomes(unittest.TestCase):
    def test_passes(self):
        pass

    def test_fails(self):
        self.assertEqual("seen", "expected")

    def test_errors(self):
        raise RuntimeError("an error in the worker")

    @unittest.skip("not today")
    def test_skipped(self):
        pass

    @unittest.expectedFailure
    def test_expected_failure(self):
        self.fail("as expected")

    def test_subtests(self):
        for n in range(3):
            with self.subTest(n=n):
                self.assertLess(n, 2, "subtest two fails")


class BrokenFixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("setUpClass broke")

    def test_never_runs(self):
        pass


class DyingWorker(unittest.TestCase):
    def test_kills_its_process(self):
        if os.environ.get("CCLB_TEST_WORKER"):
            os._exit(7)  # only in a worker: the serial run must survive to compare

    def test_after_the_death(self):
        pass


class Survivors(unittest.TestCase):
    def test_one(self):
        pass

    def test_two(self):
        pass
'''

# Runs the scratch package the way tests/__init__.py runs the real one.
DRIVER = '''
import sys, unittest
sys.path.insert(0, {top!r})
from tests.parallel import ParallelSuite
loader = unittest.TestLoader()
suite = loader.discover({scratch!r}, top_level_dir={root!r})
jobs = int(sys.argv[1])
if jobs > 1:
    suite = ParallelSuite(suite, jobs)
result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
sys.exit(0 if result.wasSuccessful() else 1)
'''


class ParallelRunnerTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.root = tempfile.TemporaryDirectory()
        scratch = os.path.join(cls.root.name, "scratch")
        os.mkdir(scratch)
        open(os.path.join(scratch, "__init__.py"), "w").close()
        with open(os.path.join(scratch, "test_scratch.py"), "w") as handle:
            handle.write(SCRATCH_TESTS)
        driver = textwrap.dedent(DRIVER).format(top=TOP_DIR, scratch=scratch, root=cls.root.name)
        env = dict(os.environ, PYTHONPATH=cls.root.name)  # the workers import the scratch package too
        env.pop("CCLB_TEST_WORKER", None)
        cls.runs = {jobs: subprocess.run([sys.executable, "-c", driver, str(jobs)], cwd=TOP_DIR, env=env,
                                         capture_output=True, text=True, timeout=60)
                    for jobs in (1, 2)}

    @classmethod
    def tearDownClass(cls) -> None:
        cls.root.cleanup()

    def verdicts(self, jobs: int) -> dict[str, str]:
        """test name -> the verdict the text runner printed for it."""
        lines = re.findall(r"^(\w+) \(scratch\.test_scratch\.\w+\.\w+\) \.\.\. (.+)$",
                           self.runs[jobs].stdout, re.M)
        return dict(lines)

    def test_every_outcome_is_reported_as_in_a_serial_run(self) -> None:
        serial, parallel = self.verdicts(1), self.verdicts(2)
        del serial["test_kills_its_process"], parallel["test_kills_its_process"]
        serial.pop("test_subtests", None)  # the serial runner prints a failing subtest on a line of its own
        self.assertEqual(parallel.pop("test_subtests"), "FAIL")
        self.assertEqual(parallel, serial)
        self.assertEqual(parallel["test_fails"], "FAIL")
        self.assertEqual(parallel["test_errors"], "ERROR")
        self.assertEqual(parallel["test_skipped"], "skipped 'not today'")
        self.assertEqual(parallel["test_expected_failure"], "expected failure")
        self.assertEqual(parallel["test_one"], "ok")
        self.assertEqual(parallel["test_after_the_death"], "ok", "the rest of a dead worker's class runs on")

    def test_failures_carry_the_workers_traceback(self) -> None:
        out = self.runs[2].stdout
        self.assertIn("AssertionError: 'seen' != 'expected'", out)
        self.assertIn("RuntimeError: an error in the worker", out)
        self.assertIn("subtest two fails", out)
        self.assertIn("RuntimeError: setUpClass broke", out)
        self.assertNotIn("test_never_runs", out, "a test whose class fixture failed did not run")

    def test_a_dead_worker_fails_the_run_and_the_rest_still_runs(self) -> None:
        run = self.runs[2]
        self.assertEqual(run.returncode, 1)
        self.assertRegex(run.stdout, r"test_kills_its_process .*\.\.\. ERROR")
        self.assertIn("the worker process running this test ended with code 7", run.stdout)
        self.assertEqual(self.verdicts(2)["test_two"], "ok")

    def test_the_summary_counts_match(self) -> None:
        serial = re.search(r"FAILED \((.*)\)", self.runs[1].stdout)
        parallel = re.search(r"FAILED \((.*)\)", self.runs[2].stdout)
        assert serial is not None and parallel is not None, self.runs[2].stdout
        # Serial: the process survives test_kills_its_process (one more pass, one fewer error).
        self.assertEqual(serial.group(1), "failures=2, errors=2, skipped=1, expected failures=1")
        self.assertEqual(parallel.group(1), "failures=2, errors=3, skipped=1, expected failures=1")
        ran = [re.findall(r"^Ran (\d+) tests?", self.runs[jobs].stdout, re.M) for jobs in (1, 2)]
        self.assertEqual(ran[0], ran[1])  # 10 (3.11) or 9 (3.12+ leaves the skipped test out)
        self.assertIn(ran[1], (["10"], ["9"]))


if __name__ == "__main__":
    unittest.main()
