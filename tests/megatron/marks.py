"""The marks of a multi-process Megatron-Core test, in one decorator."""

from __future__ import annotations

import pytest

__all__ = ["megatron_test"]


def megatron_test(test):
    """Marks a test slow + megatron and skips it where Megatron-Core is not installed (through the
    ``megatron_core`` fixture of ``tests/conftest.py``)."""
    test = pytest.mark.usefixtures("megatron_core")(test)
    return pytest.mark.slow(pytest.mark.megatron(test))
