"""Reference models shared by the examples in ``launch/``, the tests and the benchmarks.

A model that more than one of them builds lives here once, so that a test and the script a user copies
train the same thing: :mod:`~dualpipe_plugin.reference.megatron_gpt` (a tiny GPT on Megatron-Core: its
config, ``model_provider``, data, ``forward_step`` and ``loss_func``) and
:mod:`~dualpipe_plugin.reference.megatron_names` (its layout-independent parameter names and weights).
Importing this package imports neither torch nor Megatron-Core.
"""
