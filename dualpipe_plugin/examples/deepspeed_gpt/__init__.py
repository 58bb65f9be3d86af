"""A small GPT trained with DeepSpeed pipeline parallelism on a DualPipe schedule: an example to copy.

One GPU per process; P pipeline stages; the processes beyond P are data-parallel replicas (dp = world / P).
The schedule is the config's ``"pipeline": {"schedule": "dualpipev"}`` (or dualpipe, 1f1b, zb1p, deepspeed)::

    torchrun --nproc-per-node 8 -m dualpipe_plugin.examples.deepspeed_gpt \\
        --deepspeed_config configs/deepspeed/dualpipev.json --pipeline-stages 4 --steps 200
    torchrun --nproc-per-node 4 -m dualpipe_plugin.examples.deepspeed_gpt --cpu --deepspeed_config ... --steps 2

From a clone, ``launch/train_deepspeed.py`` is the same program (for ``deepspeed --num_gpus 8`` and the
scripts in ``launch/``).

The model (:mod:`.model`): a token embedding and a learned position embedding, ``--layers`` pre-norm
transformer blocks of plain torch layers, a final LayerNorm and an output head that shares the embedding's
weight (a ``TiedLayerSpec``). The data (:mod:`.data`): a character-level corpus generated in code (a small
deterministic grammar, no download), byte-valued tokens, random windows chosen by (step, replica,
micro-batch). The command line and the config's checks: :mod:`.job`; the loop and ``main``: :mod:`.train`.

``--preflight N`` checks the arguments and the config for a job of N processes in this one process and
exits (0 and an ``ok`` line, or 2 and one ``error:`` line); the launch scripts run it before they start
any rank, so a wrong path or a schedule the rank count cannot run fails in a second, without a traceback.
"""
