"""GPT pretraining on Megatron-Core with the pipeline schedule as one flag: ``--pipeline-schedule``.

GPU (one process per GPU; NCCL)::

    torchrun --nproc-per-node 8 -m dualpipe_plugin.examples.megatron_gpt \\
        --num-layers 16 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 \\
        --micro-batch-size 2 --global-batch-size 64 --pipeline-model-parallel-size 4 \\
        --pipeline-schedule dualpipev --lr 3e-4 --train-iters 1000 --log-interval 10 --bf16 \\
        --use-distributed-optimizer --save ckpt --save-interval 500

CPU (laptops, CI; gloo and :func:`dualpipe_plugin.megatron.enable_cpu_mode`), spawning the ranks itself::

    python -m dualpipe_plugin.examples.megatron_gpt --cpu --nproc 2 --num-layers 4 --hidden-size 64 \\
        --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 8 \\
        --pipeline-model-parallel-size 2 --pipeline-schedule dualpipev --train-iters 20 --log-interval 5

From a clone, ``launch/pretrain_gpt.py`` takes the same arguments.

``--pipeline-schedule``: ``megatron`` (Megatron-Core's own 1F1B, or interleaved with
``--virtual-pipeline-model-parallel-size``), ``dualpipev``, ``dualpipe``, ``1f1b``, ``zb1p``. Everything else
is Megatron-Core: ``parallel_state`` (TP, PP, DP, EP), ``GPTModel`` (local layer spec; Transformer Engine
when ``--transformer-impl transformer_engine`` and installed), DDP, the (distributed) optimizer,
``finalize_model_grads``, distributed checkpointing (``--save``/``--load``; layer keys are global, so a
checkpoint written under one schedule loads under another with the same TP/EP sizes).

The model, its config, data, ``forward_step`` and ``loss_func`` are the reference tiny GPT
(:mod:`dualpipe_plugin.reference.megatron_gpt`) at the sizes given. Data is synthetic and learnable (each
sequence counts up from a random start by a random step, modulo the vocabulary), generated from
``--seed`` per iteration and global micro-batch, so every data-parallel, pipeline and schedule layout sees
the same tokens. Only the chunks that hold the embedding or the loss read it. The loss printed is
Megatron-LM's: token-weighted mean over the global batch.

Modules: :mod:`.arguments` (the command line and its checks), :mod:`.model` (this rank's wrapped chunks),
:mod:`dualpipe_plugin.megatron.checkpointing` (distributed checkpoints), :mod:`.train` (the loop and ``main``).
"""
