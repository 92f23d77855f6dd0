"""CPU threads for the tests' torch work: both cores, or one per worker under pytest-xdist
(two workers on two cores; more threads than cores make torch's thread pools spin)."""

import os

TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
