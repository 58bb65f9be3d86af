"""``python -m dualpipe_plugin.examples.deepspeed_gpt ...``: see the package docstring."""

import sys

from dualpipe_plugin.examples.deepspeed_gpt.train import main

sys.exit(main())
