"""``dualpipe-plugin bench compare``: our schedules side by side with torch, DeepSpeed and Megatron-Core.

``dualpipe-plugin bench compare [--quick] [--json]``

Everything runs on the emulated device (real tiny math plus fixed sleeps per layer; real gloo P2P and
all-to-all) with one :class:`~dualpipe_plugin.bench.workload.Workload`: P=4 ranks, 16 micro-batches,
8 layers of Linear(64)+tanh in all, per layer F=10, B=20 (I = B - W), W=10 ms (``--emulate``), so the
ideal step is 16·8·30/4 = 960 ms. Two cost models:

* **compute**: the dense model. Ours: dualpipe, dualpipev, 1f1b, zb1p standalone (``DualPipeline``), and
  dualpipev through DeepSpeed and through Megatron-Core. Peers: torch.distributed.pipelining
  ScheduleDualPipeV, Schedule1F1B, ScheduleZBVZeroBubble; DeepSpeed TrainSchedule and DualPipeVEngine;
  Megatron-Core 1F1B and interleaved (VP=2).
* **moe**: 8 reference MoE blocks whose compute carries the same per-block costs and whose dispatch and
  combine are real gloo all-to-alls over an expert-parallel group orthogonal to the pipeline
  (P=4 × EP=2 = 8 processes), sized (``wire_padding``, calibrated first) to about 40% of a block's
  forward and of its input-gradient part. Ours: dualpipev with the overlap engine (and, in full mode,
  without it). Peers: torch ScheduleDualPipeV (pairs run sequentially), DeepSpeed TrainSchedule and
  DualPipeVEngine (the blocks as LayerSpecs).

How it measures: each entry is one ``run_local`` job (spawned afresh for every entry in every round);
rounds interleave the entries (A B C ... A B C ...) so drift hits all alike. In a job: 2 warm-up steps,
then ``steps`` measured steps, each started after a barrier; a step's time is ``max(end) - min(start)``
over the ranks. Per entry: the median step time (all rounds), the **paired ratio** to DeepSpeed's
TrainSchedule of the same cost model (per round: the entry's median / TrainSchedule's median of that
round; the median over rounds), the ratio to the best peer's median, measured / simulated (our simulator
with the costs the entry actually pays: see ``simulated_as``), and the peak of live activations
(per rank, in micro-batch activations of 1/P of the model). The load average is recorded per job.

Outputs (full mode): ``benchmarks/results/compare.json``, ``compare.md`` (the table), ``compare.png``
(bar chart), ``scale.json`` + ``scale_bubble.png`` (:mod:`dualpipe_plugin.bench.scale`) and the README
table between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``. ``--quick`` (one round, 1 warm-up and
2 measured steps, the recorded all-to-all calibration when there is one; < 5 min) writes
``compare_quick.*`` and leaves the README alone. ``python -m dualpipe_plugin.bench.compare readme
[results.json]`` regenerates the README table from a results file.

The benchmark's rooms: :mod:`.entries` (what is compared), :mod:`.config` (the settings and the two
workloads), :mod:`.calibrate` (the all-to-all calibration), :mod:`.simulate` (what our simulator predicts
for each entry), :mod:`.run` (the jobs and the results rows), :mod:`.summary` (medians, paired ratios,
goals), :mod:`.report` (tables, README, outputs), :mod:`.chart` (the bar chart), :mod:`.cli` (the command
line).
"""
