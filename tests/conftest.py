import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

import pytest


@pytest.fixture(autouse=True)
def _private_attention_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty attention cache, so no test reads another's results."""
    monkeypatch.setenv("FASTDELTA_CACHE", str(tmp_path_factory.mktemp("fastdelta-cache")))
