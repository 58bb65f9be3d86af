"""The framework examples users copy, as package modules: a small GPT on DeepSpeed's pipeline engine
(:mod:`~dualpipe_plugin.examples.deepspeed_gpt`) and GPT pretraining on Megatron-Core
(:mod:`~dualpipe_plugin.examples.megatron_gpt`), each with the schedule as one config key or flag.

Run them with ``python -m dualpipe_plugin.examples.<name>`` (or under torchrun with ``-m``);
``launch/train_deepspeed.py`` and ``launch/pretrain_gpt.py`` are the same programs' doors from a clone of
the repository, and ``dualpipe-plugin demo --engine deepspeed|megatron`` runs them from the installed
package.
"""
