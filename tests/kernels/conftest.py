"""Kernel tests: ``interp`` cases run only in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton's
import), which ``test_interpreter_runner.py`` starts once in a subprocess for the whole directory."""

import importlib.util
import os

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    skip_interp = pytest.mark.skip(reason="interpreter case: runs in test_interpreter_runner's TRITON_INTERPRET=1 "
                                          "subprocess")
    skip_triton = pytest.mark.skip(reason="needs Triton")
    for item in items:
        if "interp" in item.keywords and not INTERP:
            item.add_marker(skip_interp)
        elif ("interp" in item.keywords or "gpu" in item.keywords) and not HAS_TRITON:
            item.add_marker(skip_triton)
