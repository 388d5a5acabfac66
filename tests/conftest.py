"""pytest's setup for tests/: importing helpers puts the project root on
sys.path, so that every test module can import llm, train, bench and data."""
import helpers  # noqa: F401


def pytest_configure(config):
    """The tests run every kernel ('fastops'), not only those the calibration
    picked for this machine; test_fastops.py checks the 'auto' choice itself."""
    import llm
    if llm._fastops is not None:
        llm.set_backend("fastops")
