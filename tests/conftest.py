"""pytest's setup for tests/: importing helpers puts the project root on
sys.path, so that every test module can import llm, train, bench and data."""
import helpers  # noqa: F401
