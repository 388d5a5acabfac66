import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def shared_file(name):
    """A file from ../shared/data, or skip: users who clone the project lack it."""
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent")
    return path


def pytest_configure(config):
    """The tests run every kernel ('fastops'), not only those the calibration
    picked for this machine; test_fastops.py checks the 'auto' choice itself."""
    import llm
    if llm._fastops is not None:
        llm.set_backend("fastops")
