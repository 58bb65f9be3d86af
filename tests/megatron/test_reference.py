"""The reference Megatron GPT module (``dualpipe_plugin.reference``) loads Megatron-Core only when used, like
the adapter: importing it must work, and stay light, where neither torch nor Megatron is imported."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_reference_model_imports_neither_torch_nor_megatron():
    code = (
        "import sys, dualpipe_plugin.reference.megatron_gpt, dualpipe_plugin.reference.megatron_names; "
        "bad = [n for n in ('torch', 'megatron') if n in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
