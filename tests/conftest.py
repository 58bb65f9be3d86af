"""Fixtures shared by the test folders.

``megatron_core``: Megatron-Core's ``megatron.core`` module, or the test is skipped where it is not
installed; multi-process Megatron tests take it through :func:`tests.megatron.marks.megatron_test`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def megatron_core():
    """``megatron.core``; skips the requesting test where Megatron-Core is not installed."""
    return pytest.importorskip("megatron.core")
