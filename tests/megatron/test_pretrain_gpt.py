"""``launch/pretrain_gpt.py`` on CPU: every ``--pipeline-schedule`` trains, from one initialisation alike.

One 2-process gloo launch runs the script's ``main`` for each schedule in turn (3 iterations, tiny GPT,
``--layout-independent-init`` so that all layouts start from the same weights), a bf16 + distributed
optimizer run saved and resumed, a ``--save`` under dualpipev and a ``--load`` under 1F1B that resumes it. Iteration 1's loss
is bit-identical across schedules (same forward); later iterations agree to rel 1e-5 (the tied
embedding's gradient is summed in a different order per layout, ~1 ulp, before Adam).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dualpipe_plugin.launch import run_local

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "pretrain_gpt.py"
TINY = ["--cpu", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--pipeline-model-parallel-size", "2",
        "--lr", "1e-3", "--log-interval", "1", "--layout-independent-init"]


def _script():
    name = "pretrain_gpt_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _rank(rank: int, world_size: int, runs: tuple[tuple[str, ...], ...]):
    script = _script()
    return [SimpleNamespace(**dataclasses.asdict(script.main(list(argv)))) for argv in runs]


@pytest.mark.slow
@pytest.mark.megatron
def test_every_schedule_trains_and_checkpoints_move_between_schedules(tmp_path):
    pytest.importorskip("megatron.core")
    ckpt = str(tmp_path / "ckpt")
    ckpt_bf16 = str(tmp_path / "ckpt_bf16")
    three = ["--train-iters", "3"]
    bf16_distopt = ["--pipeline-schedule", "dualpipev", "--bf16", "--use-distributed-optimizer"]
    runs = {
        "megatron": [*TINY, *three, "--pipeline-schedule", "megatron"],
        "megatron_interleaved": [*TINY, *three, "--pipeline-schedule", "megatron",
                                 "--virtual-pipeline-model-parallel-size", "2"],
        "1f1b": [*TINY, *three, "--pipeline-schedule", "1f1b"],
        "zb1p": [*TINY, *three, "--pipeline-schedule", "zb1p"],
        "dualpipev": [*TINY, *three, "--pipeline-schedule", "dualpipev", "--save", ckpt, "--save-interval", "2"],
        "dualpipe": [*TINY, *three, "--pipeline-schedule", "dualpipe"],
        "dualpipev_bf16_distopt": [*TINY, *three, *bf16_distopt, "--save", ckpt_bf16, "--save-interval", "3"],
        "dualpipev_bf16_distopt_5": [*TINY, "--train-iters", "5", *bf16_distopt],
        "dualpipev_bf16_distopt_resumed": [*TINY, "--train-iters", "5", *bf16_distopt, "--load", ckpt_bf16],
        "1f1b_resumed": [*TINY, "--train-iters", "5", "--pipeline-schedule", "1f1b", "--load", ckpt],
        "megatron_5": [*TINY, "--train-iters", "5", "--pipeline-schedule", "megatron"],
    }
    names = list(runs)
    per_rank = run_local(_rank, 2, args=(tuple(tuple(runs[n]) for n in names),), timeout_s=420)
    last = {name: per_rank[1][i] for i, name in enumerate(names)}  # rank 1 is the last pipeline rank
    assert all(not per_rank[0][i].losses for i in range(len(names))), "losses are reported on the last rank"

    reference = last["megatron"].losses
    assert len(reference) == 3 and all(math.isfinite(x) for x in reference)
    for name in ("megatron_interleaved", "1f1b", "zb1p", "dualpipev", "dualpipe"):
        losses = last[name].losses
        assert losses[0] == reference[0], name
        assert losses == pytest.approx(reference, rel=1e-5), name
    assert last["dualpipev_bf16_distopt"].losses == pytest.approx(reference, rel=1e-2)
    assert (tmp_path / "ckpt" / "iter_0000002").is_dir() and (tmp_path / "ckpt" / "iter_0000003").is_dir()

    # bf16 + the distributed optimizer save and resume (its state sharded dp_reshardable): bit for bit.
    resumed_bf16 = last["dualpipev_bf16_distopt_resumed"]
    assert resumed_bf16.first_iteration == 3
    assert resumed_bf16.losses == last["dualpipev_bf16_distopt_5"].losses[3:]

    resumed = last["1f1b_resumed"]
    assert resumed.first_iteration == 3 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(last["megatron_5"].losses[3:], rel=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pipeline-schedule", "dualpipev", "--virtual-pipeline-model-parallel-size", "2"],
         "places two chunks per rank itself"),
        (["--pipeline-schedule", "dualpipev", "--num-layers", "6"], "num_layers=6 is not divisible by 4"),
        (["--pipeline-schedule", "dualpipev", "--global-batch-size", "2"],
         "needs at least 2 x ranks = 4 micro-batches"),
        (["--pipeline-schedule", "dualpipe", "--transformer-impl", "transformer_engine"],
         "needs Transformer Engine, which is not installed"),
    ],
)
def test_bad_arguments_exit_2_before_training(extra, message):
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine  # noqa: F401

        if "transformer_engine" in extra:
            pytest.skip("Transformer Engine is installed")
    except ImportError:
        pass
    argv = [sys.executable, str(SCRIPT), *TINY, "--train-iters", "1", "--nproc", "2", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_unknown_schedule_is_an_argparse_error():
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--train-iters", "1", "--pipeline-schedule", "gpipe"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'gpipe'" in done.stderr
