"""Device memory of a build's plans: checked against a GPU's free memory before any plan loads.

Each rank runs its own engine instance of every plan, so each rank's GPU must
hold, for every graph: its weights (the plan's bytes; a weight-stripped
plan's weights come from its ONNX) and its activation memory (TensorRT's
`device_memory_size_v2`, recorded in the manifest when the plan was built as
`device_memory_bytes`). A weight-streaming plan keeps only its budget of
weights on the GPU; the rest streams in from host memory.

The weight-streaming budget is computed here, not left to TensorRT's
automatic one: the free memory of the device less what the other plans and
this plan's activations need, capped at the plan's streamable weights (the
budget demoDiffusion sets as a share of the streamable weights; ours is the
share that fits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError

# Room kept free beside the plans: the pipeline's own tensors (latents, frames of one
# chunk, the text embeddings) and CUDA's per-context allocations.
HEADROOM = 1 << 30


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class PlanNeed:
    """What one plan needs on the device (bytes)."""

    graph: str
    weights: int  # resident weights: all of them, or a streaming plan's budget
    activations: int  # 0 when the build did not record it (plans built before it was)
    streaming: bool


def plan_needs(manifest_data: Mapping, graphs, weight_streaming_budget: int | None = None) -> list[PlanNeed]:
    """Per graph, the device bytes its engine instance holds (the manifest's numbers, no TensorRT)."""
    plans = manifest_data["engines"]["plans"]
    out = []
    for name in graphs:
        entry = plans[name]
        weights = int(entry["bytes"])
        if entry.get("stripped"):
            weights = max(weights, int(manifest_data["graphs"][name].get("weight_bytes", 0)))
        streaming = bool(entry.get("weight_streaming"))
        if streaming:
            # only the budget stays resident; without one asked, whatever fits (computed at load)
            weights = min(weights, int(weight_streaming_budget or 0))
        out.append(PlanNeed(name, weights, int(entry.get("device_memory_bytes", 0)), streaming))
    return out


def check_plans_fit(needs: list[PlanNeed], free_bytes: int, *, device: str) -> None:
    """UsageError (one line) naming the graph and the bytes when this device cannot hold the plans."""
    for need in needs:
        alone = need.weights + need.activations
        if alone + HEADROOM > free_bytes:
            way_out = (
                "ask a smaller --weight-streaming-budget"
                if need.streaming
                else "build the plans with --weight-streaming (tm-export build --resume BUILD --weight-streaming)"
            )
            raise UsageError(
                f"{device}: the {need.graph} plan needs {_gib(alone)} (weights {_gib(need.weights)}, activations "
                f"{_gib(need.activations)}) + {_gib(HEADROOM)} headroom, {_gib(free_bytes)} free; {way_out}"
            )
    total = sum(n.weights + n.activations for n in needs)
    if total + HEADROOM > free_bytes:
        largest = max(needs, key=lambda n: n.weights + n.activations)
        raise UsageError(
            f"{device}: the build's plans need {_gib(total)} together (the largest, {largest.graph}, "
            f"{_gib(largest.weights + largest.activations)}) + {_gib(HEADROOM)} headroom, {_gib(free_bytes)} free; "
            "free the GPU, or build the DiT with --weight-streaming"
        )


def streaming_budget(graph: str, *, streamable: int, free_bytes: int, reserved: int, asked: int | None) -> int:
    """The weight-streaming budget to set for one plan (bytes of streamable weights kept on the GPU).

    asked: the user's --weight-streaming-budget (used as given, capped at the
    streamable weights: more would only turn streaming off). Otherwise the
    free memory less `reserved` (activations, scratch, other plans, headroom),
    capped at the streamable weights; refused when nothing is left.
    """
    if streamable < 0 or free_bytes < 0 or reserved < 0:
        raise ValueError(f"negative sizes: streamable {streamable}, free {free_bytes}, reserved {reserved}")
    if asked is not None:
        if asked < 0:
            raise UsageError(f"--weight-streaming-budget must be >= 0 bytes, got {asked}")
        return min(int(asked), streamable)
    room = free_bytes - reserved
    if room <= 0:
        raise UsageError(
            f"{graph}: weight streaming leaves no room for weights: {_gib(free_bytes)} free, {_gib(reserved)} needed "
            "for activations, scratch and the other plans; free the GPU or use a smaller request"
        )
    return min(room, streamable)


def check_budget_kept(graph: str, asked: int, kept: int) -> None:
    """UsageError when TensorRT kept another budget than the one set (read back after setting it)."""
    if int(kept) != int(asked):
        raise UsageError(
            f"{graph}: TensorRT kept a weight-streaming budget of {kept} bytes, {asked} were set; "
            "refusing to run with a budget nobody chose (give --weight-streaming-budget another size)"
        )
