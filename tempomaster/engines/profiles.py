"""TensorRT optimization profiles from a build's own plan of the generation.

A profile gives, for every dynamic input of a graph, the smallest, the
optimal and the largest shape one call may have. TensorRT tunes its tactics
for `opt` and sizes an execution context's activation memory for `max`, so
both come from what the runtime will actually send for the shape the build
serves (manifest `shape`):

- `dit`: one call per denoising step with a batch of chunks x 2 under
  guidance (cond and uncond together), chunks x 1 without;
- `vae_encoder_first` / `vae_encoder`: a stage's condition videos in one
  batch (its active chunks, as the runtime encodes them), one `_first` call
  then one call per 4 frames;
- `vae_decoder_first` / `vae_decoder`: one chunk at a time (batch 1), one
  `_first` call then one call per latent frame;

counting only a stage's active chunks (those holding a frame of the stage:
a chunk of nothing but padding is skipped by the runtime), as
`planner.plan_stages` gives them for the build's num_frames and intervals;
- `t5`: the prompt and the negative prompt in one call (batch 2 under
  guidance).

A batch above the graph's safe batch (manifest `max_batch`: no tensor past
2^31 elements) is split by the runtime as `runtime.backends` does, so the
profile sees the pieces. Per graph: batch min 1, max = the largest piece,
opt = the piece sent most often (counted over every call of a generation;
a tie goes to the larger batch, which carries more of the work). The DiT's
`frames` axis, present when the stages need different latent frame counts,
spans the ONNX's range with opt at the frame count of the most frequent
call. Pure functions of the manifest's data: no TensorRT needed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ManifestError
from ..shape_expr import eval_dim_expr, symbols_in

BATCH = "batch"
FRAMES = "frames"


@dataclass(frozen=True)
class GraphProfile:
    """One graph's profile: per dynamic input, (min, opt, max) shapes."""

    graph: str
    batch: tuple[int, int, int]
    frames: tuple[int, int, int] | None
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # "batch" or "batchxframes" -> calls per generation

    @property
    def max_batch(self) -> int:
        return self.batch[2]

    def as_dict(self) -> dict:
        return {
            "batch": list(self.batch),
            "frames": list(self.frames) if self.frames else None,
            "shapes": {n: [list(s) for s in mom] for n, mom in self.shapes.items()},
            "calls": dict(self.calls),
        }


def split_batch(total: int, limit: int) -> list[int]:
    """The pieces the runtime sends for a batch of `total` under `limit` (as `backends.base.batch_slices` slices)."""
    limit = max(1, int(limit))
    return [min(limit, total - s) for s in range(0, total, limit)]


def eval_dim(dim, symbols: Mapping[str, int]) -> int:
    """A manifest dimension (int, symbol or expression like "6*frames") at the given symbol values."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str):
        if dim in symbols:
            return int(symbols[dim])
        try:
            return eval_dim_expr(dim, symbols)
        except ValueError as err:
            raise ManifestError(f"{err}; cannot be resolved from {sorted(symbols)}") from None
    raise ManifestError(f"dimension {dim!r} cannot be resolved from {sorted(symbols)}")


def _symbols_of(dims: Sequence) -> set[str]:
    out = set()
    for d in dims:
        if isinstance(d, str):
            out.update(symbols_in(d))
        elif d is None or (isinstance(d, int) and d < 0):
            out.add("?")
    return out


def default_steps(manifest: Mapping) -> list[int]:
    """Steps per stage of the build's preset when they fit its stages, else one per stage."""
    from ..planner import validate_frame_intervals

    stages = validate_frame_intervals([int(i) for i in manifest["shape"]["intervals"]])
    try:
        from ..models.presets import get_preset

        steps = list(get_preset(manifest.get("preset") or "").defaults.steps_per_stage)
    except ValueError:
        steps = []
    return steps if len(steps) == len(stages) else [1] * len(stages)


def call_counts(
    graph: str, shape: Mapping, *, guidance: bool = True, steps_per_stage: Sequence[int] | None = None
) -> Counter:
    """(batch, latent frames) -> number of calls per generation, before any split.

    `shape` is the manifest's `shape` block; its num_frames and intervals
    are planned again here (planner.plan_stages) for the active chunks.
    latent frames is given for the DiT only (None elsewhere).
    """
    from ..planner import plan_stages

    stages = plan_stages(int(shape["num_frames"]), [int(i) for i in shape["intervals"]])
    steps = list(steps_per_stage) if steps_per_stage is not None else [1] * len(stages)
    if len(steps) != len(stages):
        raise ValueError(f"steps_per_stage needs one value per stage ({len(stages)}), got {steps}")
    counts: Counter = Counter()
    for st, n_steps in zip(stages, steps):
        n, length, f = len(st.active_chunks), st.chunk_frames, st.latent_frames
        if graph == "dit":
            counts[(n * (2 if guidance else 1), f)] += int(n_steps)
        elif graph == "vae_encoder_first":
            counts[(n, None)] += 1
        elif graph == "vae_encoder":
            counts[(n, None)] += (length - 1) // 4
        elif graph == "vae_decoder_first":
            counts[(1, None)] += n
        elif graph == "vae_decoder":
            counts[(1, None)] += n * (f - 1)
        elif graph != "t5":
            raise ValueError(f"unknown graph {graph!r}")
    if graph == "t5":
        counts[(2 if guidance else 1, None)] += 1
    return +counts  # drop zero counts (a graph not called at this shape)


def tile_base_name(name: str) -> str:
    """`vae_decoder_30x30` -> `vae_decoder` (the graph a tiled build's tile-shape variant stands for)."""
    m = re.fullmatch(r"(vae_\w+?)_\d+x\d+", name)
    return m.group(1) if m else name


def graph_profile(
    name: str, graph: Mapping, shape: Mapping, *, guidance: bool = True, steps_per_stage: Sequence[int] | None = None
) -> GraphProfile:
    """The profile of one manifest graph entry (inputs with symbolic shapes, max_batch, meta)."""
    safe = int(graph["max_batch"])
    # a tiled build's VAE graph for one tile shape (vae_decoder_30x30) is called as its base graph is, per tile
    counts = call_counts(tile_base_name(name), shape, guidance=guidance, steps_per_stage=steps_per_stage)
    if not counts:
        # A graph the shape never calls (e.g. vae_decoder for one latent frame): one batch-1 call.
        counts = Counter({(1, max(graph.get("meta", {}).get("latent_frames") or [1]) if name == "dit" else None): 1})
    pieces: Counter = Counter()
    for (b, f), k in counts.items():
        for p in split_batch(b, safe):
            pieces[(p, f)] += k
    # most frequent (batch, frames); ties go to the larger batch, then the larger frame count
    opt_b, opt_f = max(pieces, key=lambda bf: (pieces[bf], bf[0], bf[1] or 0))
    batch = (1, opt_b, max(b for b, _ in pieces))
    dynamic = {i["name"]: i["shape"] for i in graph["inputs"] if _symbols_of(i["shape"])}
    used = set().union(*(_symbols_of(d) for d in dynamic.values())) if dynamic else set()
    unknown = used - {BATCH, FRAMES}
    if unknown:
        raise ManifestError(f"graph {name!r}: dynamic dimensions {sorted(unknown)} have no profile rule")
    frames = None
    if FRAMES in used:
        have = [int(v) for v in graph.get("meta", {}).get("latent_frames") or []] or [f for _, f in pieces]
        frames = (min(have), int(opt_f) if opt_f is not None else max(have), max(have))
    shapes = {}
    for inp, dims in dynamic.items():
        mom = []
        for k in range(3):
            sym = {BATCH: batch[k]}
            if frames is not None:
                sym[FRAMES] = frames[k]
            mom.append(tuple(eval_dim(d, sym) for d in dims))
        shapes[inp] = tuple(mom)
    calls = {
        (f"{b}x{f}" if f is not None else str(b)): k
        for (b, f), k in sorted(pieces.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    }
    return GraphProfile(name, batch, frames, shapes, calls)


def build_profiles(
    manifest: Mapping,
    *,
    guidance: bool = True,
    steps_per_stage: Sequence[int] | None = None,
    graphs: Sequence[str] | None = None,
) -> dict[str, GraphProfile]:
    """Profiles for every graph of a build (manifest.json data), or those in `graphs`."""
    steps = list(steps_per_stage) if steps_per_stage is not None else default_steps(manifest)
    names = list(graphs) if graphs is not None else list(manifest["graphs"])
    return {
        n: graph_profile(n, manifest["graphs"][n], manifest["shape"], guidance=guidance, steps_per_stage=steps)
        for n in names
    }
