"""The FP8 quality report: how far the fake-quantized DiT moves from the unquantized one.

On held-out prompts (never used for calibration), for scales taken from the
same calibration run: `all_stages` (FP8 Linears, the amax over the whole
next-frame-rate trajectory), `stage0_only` (FP8 Linears, the amax over stage
0 alone, what a single-stage generic recipe would give) and, when the
calibration recorded the attentions' inputs, `all_fp8` (FP8 Linears and FP8
q, k, v into every self-attention, q and k smoothed and rotated first
(`qk_transform`), all-stage amax: what `--fp8-attention on` builds):

- per stage and step, the relative error ||v_fp8 - v|| / ||v|| of the FP8
  velocity against the unquantized velocity on the same inputs (the
  unquantized trajectory, cond and uncond halves together);
- the PSNR of the final frames of whole generations, FP8 against
  unquantized, same prompt and seed.

The FP8 DiT is `fp8.quantize_dit` run in torch: the same float8 cast as the
exported Q/DQ graph (tests check the fp32-based graph against it through
onnxruntime to 1e-5).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ..interrupts import raise_if_interrupted

VARIANTS = ("all_stages", "stage0_only", "all_fp8")
VARIANT_TITLES = {"all_stages": "FP8 Linears", "stage0_only": "stage 0 only", "all_fp8": "all FP8"}
PSNR_CAP_DB = 100.0


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in float64) of two tensors of the same shape."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr(frames: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1], on the [0, 1] scale; identical videos give PSNR_CAP_DB."""
    mse = float((((frames.double() - ref.double()) / 2) ** 2).mean())
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return 10 * math.log10(1.0 / mse)


def quality_report(
    models,
    shape,
    calibration,
    *,
    backend=None,
    prompts: int = 4,
    exclude: Sequence[str] = (),
    steps: Sequence[int] | None = None,
    seed: int = 1000,
    skip_blocks: Sequence[int] = (),
    scale_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    held_out: Sequence[str] | None = None,
    measure: Callable | None = None,
    variants: Sequence[str] | None = None,
) -> dict:
    """Run the held-out generations and return the report (a JSON-ready dict).

    backend: a TorchBackend over `models` (one is made at the DiT's dtype if
    None). steps: steps per stage (default the calibration's). scale_dtype:
    the scales rounded as the deployed graph stores them (bf16 by default).
    held_out: the prompts to report on (default: the built-in held-out set).
    measure: ``measure(prompt, result) -> dict`` of figures read off a
    generation (e.g. the toy's `quality.measure_video`); called on the
    unquantized and on each FP8 video, reported under ``video_measures``.
    variants: the FP8 variants to run (default: every one of VARIANTS the
    calibration allows).
    """
    from tqdm.auto import tqdm

    from ..runtime.backends.torch import TorchBackend
    from ..runtime.pipeline import generate
    from .fp8 import quantize_dit
    from .prompts import HELD_OUT_PROMPTS, CalibrationPrompt
    from .trajectory import VelocityOverride, make_request

    backend = backend or TorchBackend(models, dtype=models.dit.dtype)
    dtype = backend.dtype
    steps = list(steps or calibration.data["settings"]["steps_per_stage"])
    held = [p for p in (HELD_OUT_PROMPTS if held_out is None else held_out) if p not in set(exclude)][:prompts]
    if not held:
        raise ValueError("no held-out prompts left for the quality report")
    wanted = VARIANTS if variants is None else tuple(variants)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown or not wanted:
        raise ValueError(f"variants: {unknown or 'none'} given; choose among {', '.join(VARIANTS)}")
    tables = {"all_stages": calibration.layer_table(), "stage0_only": calibration.layer_table([0])}
    qdits = {
        k: quantize_dit(backend.dit, t, dtype, "tensor", skip_blocks, copy=True, scale_dtype=scale_dtype)
        for k, t in tables.items()
        if k in wanted
    }
    if "all_fp8" in wanted and (variants is not None or calibration.has_attention):
        qdits["all_fp8"] = quantize_dit(
            backend.dit,
            tables["all_stages"],
            dtype,
            "tensor",
            skip_blocks,
            copy=True,
            scale_dtype=scale_dtype,
            attention=calibration.attention_table(),
            attention_kinds=("self_attn",),
        )
    variants_run = [k for k in VARIANTS if k in qdits]
    errors = {k: [[[] for _ in range(n)] for n in steps] for k in variants_run}
    psnrs = {k: [] for k in variants_run}
    measures = {}
    t0 = time.perf_counter()
    bar = tqdm(held, desc="quality report", unit="video", disable=not progress)
    for i, prompt in enumerate(bar):
        raise_if_interrupted()
        request = make_request(CalibrationPrompt(prompt), shape, models.preset, steps, seed + i)

        @torch.inference_mode()
        def compare(event):
            # every FP8 variant answers the unquantized trajectory's own DiT inputs
            for k, q in qdits.items():
                errors[k][event.stage][event.step].append(rel_error(q(*event.inputs), event.velocity))

        ref = generate(backend, models.tokenizer, request, progress=False, on_step_end=compare)
        if measure is not None:
            measures[prompt] = {"unquantized": measure(prompt, ref)}
        for k, q in qdits.items():
            run = generate(VelocityOverride(backend, q), models.tokenizer, request, progress=False)
            psnrs[k].append(round(psnr(run.video.frames, ref.video.frames), 3))
            if measure is not None:
                measures[prompt][k] = measure(prompt, run)
    bar.close()
    variants = {}
    for k in variants_run:
        per_step = [[{"mean": sum(e) / len(e), "max": max(e)} for e in stage_errors] for stage_errors in errors[k]]
        flat = [x for stage_errors in errors[k] for e in stage_errors for x in e]
        variants[k] = {
            "velocity_rel_error": per_step,
            "velocity_rel_error_mean": sum(flat) / len(flat),
            "velocity_rel_error_max": max(flat),
            "psnr_db": psnrs[k],
            "psnr_db_mean": sum(psnrs[k]) / len(psnrs[k]),
            "psnr_db_min": min(psnrs[k]),
        }
    return {
        "prompts": held,
        "seed": seed,
        "steps_per_stage": steps,
        "dtype": str(dtype).replace("torch.", ""),
        "weight_scale": "tensor",
        "scale_dtype": str(scale_dtype).replace("torch.", ""),
        "skip_blocks": list(skip_blocks),
        "shape": calibration.data["shape"],
        "preset": calibration.data["preset"],
        "psnr_cap_db": PSNR_CAP_DB,
        "seconds": round(time.perf_counter() - t0, 2),
        "variants": variants,
        **({"video_measures": measures} if measure is not None else {}),
    }


def format_report(report: dict) -> str:
    """A readable table of the report: one column per variant (FP8 Linears, stage 0 only, all FP8)."""
    names = [k for k in VARIANTS if k in report["variants"]]
    cols = [report["variants"][k] for k in names]

    def row(label: str, values, fmt: str) -> str:
        return f"  {label:>10}" + "".join(f"  {v:>12{fmt}}" for v in values)

    lines = [
        f"FP8 quality report: {len(report['prompts'])} held-out prompt(s), steps {','.join(map(str, report['steps_per_stage']))}, "
        f"{report['dtype']} base",
        "velocity relative error ||v_fp8 - v|| / ||v|| (mean over prompts)",
        f"  {'stage':>5} {'step':>4}" + "".join(f"  {VARIANT_TITLES[k]:>12}" for k in names),
    ]
    for s, per_stage in enumerate(cols[0]["velocity_rel_error"]):
        for t in range(len(per_stage)):
            lines.append(
                f"  {s:>5} {t:>4}" + "".join(f"  {c['velocity_rel_error'][s][t]['mean']:>12.5f}" for c in cols)
            )
    lines.append(row("mean", [c["velocity_rel_error_mean"] for c in cols], ".5f"))
    lines.append(row("max", [c["velocity_rel_error_max"] for c in cols], ".5f"))
    lines.append("final-frame PSNR vs unquantized (dB, same seed)")
    lines.append(row("mean", [c["psnr_db_mean"] for c in cols], ".2f"))
    lines.append(row("min", [c["psnr_db_min"] for c in cols], ".2f"))
    return "\n".join(lines)
