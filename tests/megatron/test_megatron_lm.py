"""Megatron-LM's own training loop (``megatron.training.pretrain``) with ``--pipeline-schedule``.

A script shaped like Megatron-LM's ``pretrain_gpt.py`` (``dualpipe_plugin/examples/megatron_lm_gpt.py``:
its ``get_batch``/``is_dataset_built_on_rank`` ask Megatron's rank-based stage questions, unchanged) runs
through ``run_megatron_lm --cpu`` with ordinary Megatron-LM arguments. Every per-micro-batch loss
(training and evaluation) is compared with Megatron's own schedule on the same model and data: the
first iteration bit for bit; later ones within Megatron's own spread between its 1F1B and interleaved
schedules on this model (the tied embedding's gradient is a sum of the same two terms taken in another
order: about 1e-7 relative, measured below).

Runs on megatron-core >= 0.19 only (its wheel ships ``megatron.training``): the second CI leg.
"""

from __future__ import annotations

import pytest

from tests.megatron.megatron_lm import MOE, JobResult, max_relative_difference, run_job, script

pytestmark = [pytest.mark.slow, pytest.mark.megatron]

SPREAD = 5e-7
"""Relative loss difference allowed after the first optimizer step (Megatron's own 1F1B and interleaved
differ by up to 2e-7 on this model)."""


@pytest.fixture(scope="module")
def megatron_training():
    pytest.importorskip("megatron.core")
    from dualpipe_plugin.megatron.compat import ships_megatron_training

    if not ships_megatron_training():
        pytest.skip("Megatron-LM's megatron.training is not installed (megatron-core < 0.19)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, megatron_training):
    return tmp_path_factory.mktemp("megatron_lm")


def _ok(result: JobResult) -> JobResult:
    assert result.returncode == 0, result.output[-6000:]
    assert result.blocks, result.output[-3000:]
    return result


def _same_training(ours: JobResult, megatron: JobResult) -> None:
    assert ours.train()[0] == megatron.train()[0]  # the first step, before any update: bit for bit
    assert max_relative_difference(ours, megatron) <= SPREAD


@pytest.fixture(scope="module")
def pp2(workdir):
    pp = ["--pipeline-model-parallel-size", "2"]
    return {
        "megatron_1f1b": _ok(run_job(workdir, "m1f1b", 2, pp)),
        "megatron_interleaved": _ok(run_job(workdir, "minter", 2, pp + ["--num-virtual-stages-per-pipeline-rank", "2"])),
        "dualpipev": _ok(run_job(workdir, "v", 2, pp + ["--pipeline-schedule", "dualpipev"])),
        "dualpipe": _ok(run_job(workdir, "d", 2, pp + ["--pipeline-schedule", "dualpipe"])),
    }


def test_megatron_own_schedules_spread_within_the_tolerance(pp2):
    spread = max_relative_difference(pp2["megatron_interleaved"], pp2["megatron_1f1b"])
    assert 0 < spread <= SPREAD, spread


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_pretrain_with_our_schedule_gives_megatrons_losses(pp2, schedule):
    _same_training(pp2[schedule], pp2["megatron_interleaved"])
    _same_training(pp2[schedule], pp2["megatron_1f1b"])
    assert "lm loss" in pp2[schedule].output  # Megatron-LM's own training log ran


def test_pp4_dualpipev(workdir):
    pp = ["--pipeline-model-parallel-size", "4", "--num-layers", "8", "--global-batch-size", "16"]
    megatron = _ok(run_job(workdir, "p4_inter", 4, pp + ["--num-virtual-stages-per-pipeline-rank", "2"]))
    ours = _ok(run_job(workdir, "p4_v", 4, pp + ["--pipeline-schedule", "dualpipev"]))
    _same_training(ours, megatron)


def test_tensor_parallel_2_x_pipeline_2(workdir):
    """TP ranks >= 1 of V's rank 0 get labels and loss mask of its last chunk through the TP broadcast."""
    tp = ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"]
    megatron = _ok(run_job(workdir, "tp_inter", 4, tp + ["--num-virtual-stages-per-pipeline-rank", "2"]))
    ours = _ok(run_job(workdir, "tp_v", 4, tp + ["--pipeline-schedule", "dualpipev"]))
    _same_training(ours, megatron)


def test_moe_expert_parallel_2_x_pipeline_2(workdir):
    pp = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "16"] + MOE  # DP=2: 4 micro-batches each
    megatron = _ok(run_job(workdir, "moe_inter", 4, pp + ["--num-virtual-stages-per-pipeline-rank", "2"]))
    ours = _ok(run_job(workdir, "moe_v", 4, pp + ["--pipeline-schedule", "dualpipev"]))
    _same_training(ours, megatron)
    # Megatron's --overlap-moe-expert-parallel-comm: the F&B pairs hide the all-to-all; bit for bit overlap off.
    overlapped = _ok(run_job(workdir, "moe_v_overlap", 4, pp + ["--pipeline-schedule", "dualpipev",
                                                               "--overlap-moe-expert-parallel-comm"]))
    assert overlapped.blocks == ours.blocks


def test_distributed_optimizer_save_and_resume_through_megatron_checkpointing(workdir):
    """--use-distributed-optimizer, Megatron-LM's own save_checkpoint/load_checkpoint: the resumed run's
    losses equal the uninterrupted run's bit for bit, for dualpipev and for dualpipe (whose mirrored
    copies are saved once, as replicas, and both loaded)."""
    for schedule in ("dualpipev", "dualpipe"):
        common = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", schedule,
                  "--use-distributed-optimizer", "--train-iters", "4", "--eval-interval", "4"]
        whole = _ok(run_job(workdir, f"whole_{schedule}", 2, common))
        ckpt = str(workdir / f"ckpt_{schedule}")
        first = _ok(run_job(workdir, f"first_{schedule}", 2, common + ["--save", ckpt, "--save-interval", "2",
                                                                           "--exit-interval", "2"]))
        second = _ok(run_job(workdir, f"second_{schedule}", 2, common + ["--load", ckpt, "--save", ckpt,
                                                                            "--save-interval", "2"]))
        assert first.train() == whole.train()[:2], schedule
        assert second.train() == whole.train()[2:], schedule


def test_a_patch_placed_too_late_fails_on_every_rank_naming_the_fix(workdir, tmp_path):
    """The script imports Megatron-LM's config helpers before it calls patch_megatron_lm(): the by-name
    copies are found and patched all the same (every loaded module is searched), so it trains."""
    late = tmp_path / "late_patch_pretrain_gpt.py"
    late.write_text(
        "import runpy, sys\n"
        "from megatron.training.arguments import core_transformer_config_from_args  # noqa: F401 (imported early)\n"
        "import dualpipe_plugin.megatron as dpm\n"
        "dpm.enable_cpu_mode()\n"
        "dpm.patch_megatron_lm()\n"
        f"runpy.run_path({script()!r}, run_name='__main__')\n"
    )
    result = run_job(workdir, "late", 2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev"],
                     script_path=str(late), runner=False)
    assert result.returncode == 0, result.output[-4000:]


@pytest.mark.parametrize("args,message", [
    (["--pipeline-schedule", "dualpipev", "--num-virtual-stages-per-pipeline-rank", "2"],
     "places two chunks per rank itself; remove --num-virtual-stages-per-pipeline-rank"),
    (["--pipeline-schedule", "dualpipev", "--num-layers", "6"], "num_layers=6 is not divisible by 4"),
    (["--pipeline-schedule", "dualpipev", "--global-batch-size", "6"], "at least 2 x ranks = 4 micro-batches"),
])
def test_bad_flag_combinations_fail_before_training_on_every_rank(workdir, args, message):
    result = run_job(workdir, "bad", 2, ["--pipeline-model-parallel-size", "2"] + args, timeout_s=240)
    assert result.returncode != 0 and result.returncode != -9, "must fail, not hang"
    assert result.output.count(message) >= 2, result.output[-4000:]  # every rank says it
