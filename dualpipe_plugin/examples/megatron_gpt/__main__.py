"""``python -m dualpipe_plugin.examples.megatron_gpt ...``: see the package docstring."""

import sys

from dualpipe_plugin.examples.megatron_gpt.train import command_line

sys.exit(command_line())
