"""Issue 14's "done when": a DeepSpeed user's script (tests/deepspeed/user_script.py: its own AdamW with two
parameter groups and a LambdaLR, a tied embedding, ZeRO-1, bf16, clipping) through the ``deepspeed``
launcher on CPU, 4 processes (P=2 x DP=2), changing only the JSON's ``"schedule"`` between runs.

Each run is a new launch: dualpipev trains and saves, another schedule resumes and saves, dualpipev
resumes. Every resume restores exactly what was saved (weights, fp32 masters and Adam moments by name,
bit for bit). The losses follow one uninterrupted TrainSchedule run within 1e-4 relative, not bit for
bit, by design of the model: under the V the tied embedding's two uses (first and last stage) sit on
rank 0 as ONE module whose bf16 gradient sums both uses in schedule order, where TrainSchedule keeps a
copy per stage and adds the two at the end, and the clipping norm sums in another order; Adam turns that
rounding into visible weight differences where gradients are ~0 (the attention's key bias), so weights
are not compared with TrainSchedule here. Bit-exact training and resumes against TrainSchedule are
tested in test_prebuilt_optimizer.py and test_checkpoint_placement.py (fp32, untied). A refused resume
ends with one ``error:`` line on the ranks that print before DeepSpeed's launcher stops the rest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests/deepspeed/user_script.py"
LAUNCH_TIMEOUT_S = 300
BASE_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1},
    "bf16": {"enabled": True}, "gradient_clipping": 1.0, "steps_per_print": 10**9,
    "zero_allow_untested_optimizer": True,
}


def _config(tmp_path: Path, schedule: str) -> str:
    path = tmp_path / f"ds_{schedule}.json"
    path.write_text(json.dumps({**BASE_CONFIG, "pipeline": {"schedule": schedule, "timeout_s": 120}}))
    return str(path)


def _launch(tmp_path: Path, schedule: str, *args: str) -> tuple[int, str, list[dict]]:
    """``launch/deepspeed_local.sh 4 user_script.py ...`` (the deepspeed launcher, DS_ACCELERATOR=cpu):
    (exit status, output, rank 0's per-step records)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(DUALPIPE_CPU="1", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    command = ["bash", "launch/deepspeed_local.sh", "4", SCRIPT, "--deepspeed_config", _config(tmp_path, schedule),
               *args]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{' '.join(command)} did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-6000:]}")
    steps = [json.loads(line) for line in output.splitlines() if line.startswith('{"step"')]
    return proc.returncode, output, steps


def _trained(tmp_path: Path, schedule: str, *args: str) -> list[float]:
    code, output, steps = _launch(tmp_path, schedule, *args)
    assert code == 0, output[-6000:]
    return [record["loss"] for record in steps]


def _dump(directory: Path) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Weights and optimizer state by data-parallel replica and parameter name (layer names are global; an
    expert's local index names the same expert on every rank of one replica)."""
    merged: dict[int, dict] = {}
    for file in sorted(directory.glob("rank*.pt")):
        dump = torch.load(file, weights_only=False)
        merged.setdefault(dump.pop("dp_id"), {}).update(dump)
    return merged


def _assert_same_state(saved: dict, loaded: dict) -> None:
    assert saved.keys() == loaded.keys() == {0, 1}
    for dp_id in saved:
        assert saved[dp_id].keys() == loaded[dp_id].keys()
        for name, entry in saved[dp_id].items():
            assert entry.keys() == loaded[dp_id][name].keys() == {"weight", "fp32", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(entry[k], loaded[dp_id][name][k]) for k in entry), (dp_id, name)


def _resume_chain(tmp_path: Path, middle: str, reference: list[float], *model: str) -> None:
    """dualpipev (2 steps, save) -> ``middle`` (resume, 1 step, save) -> dualpipev (resume, 1 step): the losses
    against ``reference`` (TrainSchedule, 4 steps); each resume restores exactly what was saved."""
    ckpt = str(tmp_path / "ckpt")
    d = {name: str(tmp_path / name) for name in ("saved_v", "loaded_v", "saved_m", "loaded_m")}
    losses = _trained(tmp_path, "dualpipev", *model, "--steps", "2", "--save", ckpt, "--save-tag", "v",
                      "--dump", d["saved_v"])
    losses += _trained(tmp_path, middle, *model, "--steps", "3", "--load", ckpt, "--load-tag", "v",
                       "--dump-loaded", d["loaded_v"], "--save", ckpt, "--save-tag", "m", "--dump", d["saved_m"])
    losses += _trained(tmp_path, "dualpipev", *model, "--steps", "4", "--load", ckpt, "--load-tag", "m",
                       "--dump-loaded", d["loaded_m"])
    assert len(reference) == 4 and losses == pytest.approx(reference, rel=1e-4)
    _assert_same_state(_dump(Path(d["saved_v"])), _dump(Path(d["loaded_v"])))
    _assert_same_state(_dump(Path(d["saved_m"])), _dump(Path(d["loaded_m"])))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_user_script_dense_resumes_across_schedules_and_refuses_a_plain_deepspeed_checkpoint(tmp_path: Path) -> None:
    """Plain DeepSpeed (no plugin import) trains 4 steps and saves: the reference, and a checkpoint without
    a placement record. dualpipev -> TrainSchedule ("schedule": "deepspeed") -> dualpipev against it. Then
    the plain-DeepSpeed checkpoint resumed in full under dualpipev: one error line, no traceback."""
    stock = str(tmp_path / "stock")
    reference = _trained(tmp_path, "deepspeed", "--no-plugin", "--steps", "4", "--save", stock)
    _resume_chain(tmp_path, "deepspeed", reference)
    code, output, _ = _launch(tmp_path, "dualpipev", "--steps", "5", "--load", stock)
    assert code != 0 and "Traceback" not in output, output[-6000:]
    errors = [line for line in output.splitlines() if "user_script.py: error:" in line]
    # One line, the same, on each rank that got to print it: DeepSpeed's launcher kills the other ranks as
    # soon as one exits non-zero, so a rank slower to print can be gone first (every rank raising the same
    # error is checked in-process by test_checkpoint_placement.py).
    assert 1 <= len(errors) <= 4 and len(set(errors)) == 1, "\n".join(errors)
    assert re.search(r"written by DeepSpeed without dualpipe_plugin .*load_module_only=True", errors[0]), errors[0]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_user_script_moe_resumes_across_schedules(tmp_path: Path) -> None:
    """The same script with deepspeed.moe.layer.MoE blocks (EP=2 over the data-parallel ranks):
    dualpipev -> 1f1b -> dualpipev against TrainSchedule."""
    reference = _trained(tmp_path, "deepspeed", "--moe", "--steps", "4")
    _resume_chain(tmp_path, "1f1b", reference, "--moe")
