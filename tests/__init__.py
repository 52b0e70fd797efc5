"""cclb's test suite.

Discovering the package (the README's `python3 -m unittest discover -s tests -t . -v`) runs the
test classes in a few worker processes at once (see tests/parallel.py; `CCLB_TEST_JOBS=1` runs
them serially in one process). Naming a module (`python3 -m unittest tests.test_proxy`) runs it
in-process as usual.
"""

import os
import unittest


def load_tests(loader: unittest.TestLoader, standard_tests: unittest.TestSuite,
               pattern: str | None) -> unittest.TestSuite:
    from tests import parallel  # here, not at the top: a worker runs `python3 -m tests.parallel`
    here = os.path.dirname(os.path.abspath(__file__))
    found = loader.discover(start_dir=here, pattern=pattern or "test*.py", top_level_dir=parallel.TOP_DIR)
    jobs = parallel.jobs_wanted()
    if jobs <= 1:
        standard_tests.addTests(found)
        return standard_tests
    return parallel.ParallelSuite(found, jobs)
