"""pytest set-up for test_hope.py: Hypothesis profiles, the `slow` marker, one thread per test.

    python -m pytest -q                  # everything (what .ci/run runs)
    python -m pytest -q -m "not slow"    # the quick loop: no subprocesses, torchrun or compiles
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "dev" (the default: the quick loop) draws 10 new examples a test on every run and remembers failing
# ones; "ci" draws 30, the same every run (derandomized, no example database). `.ci/run` sets CI. A
# test over a grid of discrete cells takes a tenth of that in each cell (test_hope.CELL_EXAMPLES).
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", settings.get_profile("dev"), max_examples=30, derandomize=True, database=None,
                          print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes, torchrun or torch.compile, or trains a "
                                       "script end to end (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def one_thread():
    """The tests run thousands of tiny ops: one thread is faster for them, and on a busy machine a
    second thread only waits for a core (an oversubscribed OpenMP region stalls every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
