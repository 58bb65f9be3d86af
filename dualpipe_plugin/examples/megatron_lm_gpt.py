"""GPT pretraining on Megatron-LM's own training loop (``megatron.training.pretrain``), as Megatron-LM's
``pretrain_gpt.py`` writes it: its ``model_provider``, ``get_batch``, ``loss_func``, ``forward_step``,
``is_dataset_built_on_rank`` and dataset provider, unchanged in shape. Nothing in it knows about pipeline
schedules: ``--pipeline-schedule`` comes from :mod:`dualpipe_plugin.megatron.run_megatron_lm`, which patches
Megatron-LM before running this file (megatron-core >= 0.19, whose wheel ships ``megatron.training``)::

    torchrun --nproc-per-node 8 -m dualpipe_plugin.megatron.run_megatron_lm \\
        "$(python -c 'import dualpipe_plugin.examples.megatron_lm_gpt as m; print(m.__file__)')" \\
        --num-layers 16 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 --max-position-embeddings 1024 \\
        --micro-batch-size 1 --global-batch-size 64 --pipeline-model-parallel-size 4 --pipeline-schedule dualpipev \\
        --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --lr 3e-4 --train-iters 1000 --bf16

(``launch/pretrain_gpt_megatron_lm.sh`` and ``launch/slurm/megatron.sbatch`` run it.) On CPU add ``--cpu``
before the script path and ``--distributed-backend gloo --transformer-impl local --use-cpu-initialization``
and the fusion switches the tests use (``tests/megatron/megatron_lm.py``).

Two test affordances, both off by default: ``--layout-independent-init`` (every weight drawn from a
generator seeded by its global name, so Megatron's own layouts and this package's V or mirrored layouts
start from the same model and their losses can be compared), and ``DUALPIPE_LOSS_DUMP=path``: each rank
that computes a loss writes its per-micro-batch losses (``[phase, iteration, float.hex]``, exact) to
``path.rank<R>.json``.
"""

import atexit
import json
import os
from functools import partial
from typing import Optional

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
from megatron.training import get_args, pretrain, print_rank_0
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

BATCH_KEYS = ["attention_mask", "labels", "loss_mask", "position_ids", "tokens"]


def model_provider(pre_process=True, post_process=True, vp_stage: Optional[int] = None, config=None,
                   pg_collection=None):
    """One model chunk (Megatron-LM's signature; ``vp_stage`` is the chunk index under virtual stages)."""
    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    if args.num_experts:
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                                vp_stage=vp_stage)
    else:
        layer_spec = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                                              normalization=config.normalization)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if args.layout_independent_init:
        from dualpipe_plugin.reference.megatron_names import init_for_training

        init_for_training(model, args.seed, shard=mpu.get_tensor_model_parallel_rank())
    return model


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """Megatron-LM's get_batch (no packed sequences, MTP or hybrid context parallelism)."""
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return [None for _ in BATCH_KEYS]
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = next(data_iterator)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        for key in BATCH_KEYS:
            batch[key] = batch[key].to(device, non_blocking=True) if batch.get(key) is not None else None
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    if args.context_parallel_size > 1:
        batch = get_batch_on_this_cp_rank(batch, cp_group=mpu.get_context_parallel_group())
    return [batch.get(key) for key in BATCH_KEYS]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """Token-weighted loss, as Megatron-LM reports it: (loss sum, tokens, {"lm loss": [sum, tokens]})."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    _record(loss, num_tokens, model)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model: GPTModel, return_schedule_plan: bool = False):
    """Megatron-LM's forward_step, the schedule-plan convention (``return_schedule_plan``) included."""
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    attention_mask, labels, loss_mask, position_ids, tokens = get_batch(data_iterator, vp_stage)
    if return_schedule_plan:
        plan = model.build_schedule_plan(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
        return plan, partial(loss_func, loss_mask, model=model)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask, model=model)


def is_dataset_built_on_rank(vp_stage=None):
    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        context_parallel_size=args.context_parallel_size, data_parallel_size=args.data_parallel_size,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(is_dataset_built_on_rank, vp_stage=vp_stage), config
    ).build()


# ------------------------------------------------------------------------------------ test affordances


_LOSSES: list = []


def _record(loss, num_tokens, model) -> None:
    if os.environ.get("DUALPIPE_LOSS_DUMP"):
        phase = "train" if model is None or get_attr_wrapped_model(model, "training") else "eval"
        iteration = getattr(get_args(), "curr_iteration", None)
        _LOSSES.append((phase, iteration, (loss / num_tokens.clamp(min=1)).item().hex()))


def _dump_losses() -> None:
    """At exit (Megatron-LM's --exit-interval ends the program from inside pretrain())."""
    path = os.environ.get("DUALPIPE_LOSS_DUMP")
    if path and _LOSSES:
        with open(f"{path}.rank{os.environ.get('RANK', '0')}.json", "w") as handle:
            json.dump(_LOSSES, handle)


def extra_args(parser):
    group = parser.add_argument_group(title="example")
    group.add_argument("--layout-independent-init", action="store_true",
                       help="draw every weight from a generator seeded by its global name (compare layouts)")
    return parser


if __name__ == "__main__":
    atexit.register(_dump_losses)
    train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(extra_args_provider=extra_args, args_defaults={"tokenizer_type": "NullTokenizer"})
    pretrain(pretrain_cfg_container_from_args(args, None), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
