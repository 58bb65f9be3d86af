"""The cost file: what ``dualpipe-plugin profile`` measured about a model and a machine, as editable JSON.

One file, one model at one micro-batch shape. Times in milliseconds, sizes in bytes::

    {
      "format": "dualpipe-plugin costs", "version": 1,
      "source": "layers",                 # how the model was given: "layers", "deepspeed" or "megatron"
      "model": "free text", "microbatch": {"inputs": [[8, 64]], "dtype": ["float32"]},
      "layers": [                          # in model order; one entry per cuttable piece
        {"name": "0: Linear",
         "forward_ms": 1.2,                # F of this layer for one micro-batch
         "input_grad_ms": 1.1,             # I: the backward for its input (weight gradients deferred)
         "weight_grad_ms": 0.9,            # W: the deferred weight gradients
         "backward_ms": 2.0,               # B: the whole backward in one go
         "activation_bytes": 4096,         # what autograd saves in its forward (held until B or I)
         "saves_input_bytes": 2048,        # ... of which its input (shared with the layer before)
         "saves_output_bytes": 2048,       # ... of which its output (shared with the layer after)
         "w_store_bytes": 4096,            # held from I until W (split layers' inputs and output grads)
         "output_bytes": 2048,             # what crosses a cut placed right after this layer
         "param_bytes": 16640, "grad_bytes": 16640, "optimizer_bytes": 33280,
         "attach": null}                   # "next"/"previous": never cut from that neighbour
      ],
      "runtime": {"overhead_ms": {"F": 0.2, "I": 0.4, "W": 0.5, "B": 0.4},  # the executor's own time
                                                # per action of each kind on this machine
                  "pair_factor": 1.0,           # an F&B pair lasts pair_factor * (F + B)
                  "note": "..."},               # how the overhead was measured
      "link": {"latency_ms": 0.4, "bandwidth_bytes_per_s": 2.5e9,   # one P2P hop of the pipeline group
               "measured": true, "note": "..."}
    }

``attach`` keeps a piece with its neighbour: Megatron builds the embedding with the first transformer
layer of a stage and the output layer with the last, so a Megatron profile marks them ``"next"`` and
``"previous"``. A cut search places its cuts between *units* (a layer plus what is attached to it).
Unknown keys are kept as they are (a user may annotate the file); missing or bad numbers are refused,
naming the entry and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from dualpipe_plugin.schedules.errors import CostModelError
from dualpipe_plugin.schedules.stage_costs import Link

__all__ = ["FORMAT", "VERSION", "SOURCES", "LayerCost", "Runtime", "LinkCost", "CostProfile", "load_costs"]

FORMAT = "dualpipe-plugin costs"
VERSION = 1
SOURCES = ("layers", "deepspeed", "megatron")
_ATTACH = (None, "next", "previous")


def _number(where: str, key: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CostModelError(f"{where}.{key}={value!r} is not a number >= 0; give the measured value (ms or bytes)")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerCost:
    """One cuttable piece of the model (see the module docstring for each field)."""

    name: str
    forward_ms: float
    input_grad_ms: float
    weight_grad_ms: float
    backward_ms: float
    activation_bytes: float = 0
    saves_input_bytes: float = 0
    saves_output_bytes: float = 0
    w_store_bytes: float = 0
    output_bytes: float = 0
    param_bytes: float = 0
    grad_bytes: float = 0
    optimizer_bytes: float = 0
    attach: str | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "LayerCost":
        if not isinstance(data, dict):
            raise CostModelError(f"{where} must be an object with the layer's costs, got {type(data).__name__}")
        values: dict[str, Any] = {"name": str(data.get("name", where))}
        for item in fields(cls):
            if item.name in ("name", "attach"):
                continue
            if item.name not in data:
                if item.name in ("forward_ms", "input_grad_ms", "weight_grad_ms", "backward_ms"):
                    raise CostModelError(f"{where}.{item.name} is missing; every layer needs forward_ms, "
                                         f"input_grad_ms, weight_grad_ms and backward_ms")
                continue
            values[item.name] = _number(where, item.name, data[item.name])
        attach = data.get("attach")
        if attach not in _ATTACH:
            raise CostModelError(f"{where}.attach={attach!r}; use null, \"next\" or \"previous\"")
        values["attach"] = attach
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class Runtime:
    """What the pipeline runtime adds on this machine, per action, beyond the layers' own time (ms)."""

    F: float = 0.0
    I: float = 0.0  # noqa: E741
    W: float = 0.0
    B: float = 0.0
    pair_factor: float = 1.0
    note: str = ""
    """How the figures were measured (on the pipeline group, or by one-rank runs)."""

    @property
    def overhead(self) -> tuple[float, float, float, float]:
        """(F, I, W, B) overheads, the order :class:`~dualpipe_plugin.schedules.cuts.StageSlicer` takes."""
        return (self.F, self.I, self.W, self.B)

    def to_dict(self) -> dict:
        return {"overhead_ms": {"F": self.F, "I": self.I, "W": self.W, "B": self.B}, "pair_factor": self.pair_factor,
                "note": self.note}


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkCost:
    latency_ms: float = 0.0
    bandwidth_bytes_per_s: float | None = None
    measured: bool = False
    note: str = ""

    def link(self) -> Link:
        bandwidth = self.bandwidth_bytes_per_s
        return Link(latency=self.latency_ms, bytes_per_ms=None if not bandwidth else bandwidth / 1e3)


@dataclass(frozen=True, kw_only=True, slots=True)
class CostProfile:
    """A parsed cost file."""

    layers: tuple[LayerCost, ...]
    source: str = "layers"
    model: str = ""
    microbatch: dict = field(default_factory=dict)
    runtime: Runtime = Runtime()
    link: LinkCost = LinkCost()
    extra: dict = field(default_factory=dict)
    """Keys of the file this class does not read (machine facts, notes), written back unchanged."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise CostModelError("the cost file lists no layers; profile a model with at least one layer")
        if self.source not in SOURCES:
            raise CostModelError(f"source={self.source!r}; use one of {', '.join(SOURCES)}")
        if self.layers[0].attach == "previous" or self.layers[-1].attach == "next":
            raise CostModelError("the first layer cannot attach to a previous one, nor the last to a next one")

    # -- the units a cut search moves --------------------------------------------------------------------
    def unit_spans(self) -> tuple[tuple[int, int], ...]:
        """``[start, stop)`` layer ranges of the cuttable units (a layer with what is attached to it)."""
        starts = [i for i in range(len(self.layers))
                  if i == 0 or (self.layers[i].attach != "previous" and self.layers[i - 1].attach != "next")]
        return tuple(zip(starts, starts[1:] + [len(self.layers)]))

    def layer_bounds(self, unit_bounds: Sequence[int]) -> tuple[int, ...]:
        """Unit boundaries (``0 = b0 < ... < bS = units``) as layer boundaries."""
        spans = self.unit_spans()
        return tuple(spans[b][0] if b < len(spans) else len(self.layers) for b in unit_bounds)

    # -- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = dict(self.extra)
        data.update({
            "format": FORMAT, "version": VERSION, "source": self.source, "model": self.model,
            "microbatch": self.microbatch, "time_unit": "ms", "size_unit": "bytes",
            "layers": [asdict(layer) for layer in self.layers],
            "runtime": self.runtime.to_dict(), "link": asdict(self.link),
        })
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def with_link(self, link: LinkCost) -> "CostProfile":
        return replace(self, link=link)

    def with_runtime(self, runtime: Runtime) -> "CostProfile":
        return replace(self, runtime=runtime)

    @classmethod
    def from_dict(cls, data: Any, where: str = "costs") -> "CostProfile":
        if not isinstance(data, dict):
            raise CostModelError(f"{where} is not a JSON object; write it with dualpipe-plugin profile")
        if data.get("format") != FORMAT:
            raise CostModelError(f"{where} is not a cost file (format={data.get('format')!r}, expected {FORMAT!r}); "
                                 f"write one with dualpipe-plugin profile")
        version = data.get("version")
        if version != VERSION:
            raise CostModelError(f"{where} has version {version!r}; this dualpipe-plugin reads version {VERSION}: "
                                 f"profile the model again with this version")
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, list):
            raise CostModelError(f"{where}.layers must be a list of layer entries")
        layers = tuple(LayerCost.from_dict(entry, f"{where}.layers[{i}]") for i, entry in enumerate(raw_layers))
        runtime = data.get("runtime") or {}
        link = data.get("link") or {}
        if not isinstance(runtime, dict) or not isinstance(link, dict):
            raise CostModelError(f"{where}.runtime and {where}.link must be objects")
        pair_factor = _number(f"{where}.runtime", "pair_factor", runtime.get("pair_factor", 1.0))
        overhead = runtime.get("overhead_ms") or {}
        if not isinstance(overhead, dict):
            raise CostModelError(f"{where}.runtime.overhead_ms must be an object with F, I, W and B in ms")
        known = {"format", "version", "source", "model", "microbatch", "time_unit", "size_unit", "layers", "runtime",
                 "link"}
        return cls(
            layers=layers,
            source=data.get("source", "layers"),
            model=str(data.get("model", "")),
            microbatch=data.get("microbatch") or {},
            runtime=Runtime(
                **{kind: _number(f"{where}.runtime.overhead_ms", kind, overhead.get(kind, 0.0)) for kind in "FIWB"},
                pair_factor=pair_factor,
                note=str(runtime.get("note", "")),
            ),
            link=LinkCost(
                latency_ms=_number(f"{where}.link", "latency_ms", link.get("latency_ms", 0.0)),
                bandwidth_bytes_per_s=_number(f"{where}.link", "bandwidth_bytes_per_s",
                                              link.get("bandwidth_bytes_per_s"), allow_none=True),
                measured=bool(link.get("measured", False)),
                note=str(link.get("note", "")),
            ),
            extra={key: value for key, value in data.items() if key not in known},
        )


def load_costs(path: str | Path) -> CostProfile:
    """Read and check a cost file; every problem is a :class:`CostModelError` naming the file and entry."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CostModelError(f"cost file {str(path)!r} does not exist; write it with dualpipe-plugin profile") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise CostModelError(f"cannot read cost file {str(path)!r}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CostModelError(f"cost file {str(path)!r} is not valid JSON ({error}); fix the edit or profile again") from None
    return CostProfile.from_dict(data, where=path.name)
