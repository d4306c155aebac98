import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

import pytest


# The compiled native kernel does not depend on any test: every test (and every process a test starts)
# shares the default build, while FASTDELTA_CACHE below changes per test
os.environ.setdefault("FASTDELTA_NATIVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastdelta", "native"))


@pytest.fixture(autouse=True)
def _private_attention_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty attention cache, so no test reads another's results."""
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path_factory.mktemp("fastdelta-cache")))
