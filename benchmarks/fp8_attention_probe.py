"""Which FP8 attention input hurts: velocity error of the toy DiT with only q, only k or only v fake-quantized.

On the trained toy, for held-out prompts, the unquantized generation is run
once and the DiT inputs of a few steps of every stage are kept; on those
inputs the DiT is called again with E4M3 fake quantization (the calibrated
per-tensor amax / 448, scales rounded to bf16 as the graph stores them) on:
one attention input of every self-attention (q, k or v), all three, or all
three in one block only; with and without FP8 block Linears; q and k as they
are ("plain"), with k less its token mean ("smoothed") or smoothed and both
rotated by the Hadamard pair ("rotated", `qk_transform.transform_qk`, what
FP8Attention quantizes). Figure: the relative velocity error
||v_fp8 - v|| / ||v||, mean over the kept steps and prompts (per stage too).

    python -m benchmarks.fp8_attention_probe --calibration BUILD
        [--out benchmarks/results/fp8_attention_probe_toy.json]

BUILD: a toy calibration with the rotated q/k amax (benchmarks.fp8_report_toy
--calibration BUILD keeps the report's). The smoothed keys' amax, which
calibration does not record, is the calibrated k amax times the ratio of the
smoothed to the raw keys' amax over the kept DiT calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_backends import write_json

PROMPTS = (
    "a green square sliding left on a plain background",
    "a green triangle sliding left on a plain background",
)
SEEDS = (1001, 1005)  # their seeds in fp8_report_toy (1000 + place among the held-out prompts)
KEPT_STEPS = {0: (0, 5, 10, 15), 1: (0, 4, 7), 2: (0, 4, 7)}


TRANSFORMS = ("plain", "smoothed", "rotated")


class ProbeAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v with fake-quantized inputs: `scales` names the ones quantized ("q", "k", "v")."""

    def __init__(self, scales: dict[str, torch.Tensor], transform: str, head_dim: int):
        super().__init__()
        from tempomaster.calibration.qk_transform import hadamard_pair

        self.scales = scales
        self.transform = transform
        self.hadamard = hadamard_pair(head_dim)

    def forward(self, q, k, v):
        from tempomaster.calibration.fp8 import fake_quant
        from tempomaster.calibration.qk_transform import smooth_keys, transform_qk

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.transform == "smoothed":
            k = smooth_keys(k)
        elif self.transform == "rotated":
            q, k = transform_qk(q, k, *self.hadamard)
        q, k, v = (fake_quant(t, self.scales[n]) if n in self.scales else t for t, n in zip((q, k, v), "qkv"))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def probe_dit(base, table, inputs: str, transform: str, blocks=None):
    """A copy of `base` whose self-attentions (of `blocks`, default all) fake-quantize `inputs` ("qkv", "k", ...)."""
    import copy

    from tempomaster.calibration.fp8 import scale_from_amax

    dit = copy.deepcopy(base)
    for b, block in enumerate(dit.blocks):
        if blocks is not None and b not in blocks:
            continue
        amax = dict(table[f"blocks.{b}.self_attn"])
        if transform == "smoothed":
            amax["k"] = amax["k_smoothed"]
        elif transform == "rotated":
            amax["q"], amax["k"] = amax["q_rotated"], amax["k_rotated"]
        scales = {n: scale_from_amax(amax[n], torch.bfloat16).float() for n in inputs}
        block.self_attn.attn = ProbeAttention(scales, transform, base.cfg.head_dim)
    return dit.eval()


def smoothed_key_amax(dit, kept) -> dict[str, float]:
    """The smoothed keys' amax over the kept DiT calls (calibration records the rotated ones, not these)."""
    from tempomaster.calibration.qk_transform import smooth_keys

    amax = {}
    handles = [
        block.self_attn.attn.register_forward_pre_hook(
            lambda m, a, n=f"blocks.{b}.self_attn": amax.__setitem__(
                n, max(amax.get(n, 0.0), float(smooth_keys(a[1], token_dim=1).abs().max()))
            )
        )
        for b, block in enumerate(dit.blocks)
    ]
    with torch.inference_mode():
        for _stage, inputs, _ref in kept:
            dit(*inputs)
    for h in handles:
        h.remove()
    return amax


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_attention_probe_toy.json"))
    args = p.parse_args(argv)

    from tempomaster.calibration.collect import load_calibration
    from tempomaster.calibration.fp8 import quantize_dit
    from tempomaster.calibration.prompts import CalibrationPrompt
    from tempomaster.calibration.report import rel_error
    from tempomaster.calibration.trajectory import make_request
    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.sources import load_model_set
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import generate

    start = time.perf_counter()
    models = load_model_set("toy", None, None, torch.float32)
    shape = ExportShape.from_preset(models.preset)
    cal = load_calibration(args.calibration)
    cal.check(preset="toy", shape=shape, dit_sha256=None)
    table = cal.attention_table()
    backend = TorchBackend(models, dtype=torch.float32)
    steps = cal.data["settings"]["steps_per_stage"]

    kept = []  # (stage, inputs, velocity)
    for prompt, seed in zip(PROMPTS, SEEDS):
        request = make_request(CalibrationPrompt(prompt), shape, models.preset, steps, seed)

        def keep(event):
            if event.step in KEPT_STEPS[event.stage]:
                kept.append((event.stage, tuple(t.clone() for t in event.inputs), event.velocity.clone()))

        generate(backend, models.tokenizer, request, progress=False, on_step_end=keep)

    plain = backend.dit
    # the smoothed keys' amax: the calibrated k amax scaled by what smoothing does on the kept calls
    smoothed = smoothed_key_amax(plain, kept)
    raw = {}
    handles = [
        block.self_attn.attn.register_forward_pre_hook(
            lambda m, a, n=f"blocks.{b}.self_attn": raw.__setitem__(n, max(raw.get(n, 0.0), float(a[1].abs().max())))
        )
        for b, block in enumerate(plain.blocks)
    ]
    with torch.inference_mode():
        for _stage, inputs, _ref in kept:
            plain(*inputs)
    for h in handles:
        h.remove()
    for name in table:
        if name in smoothed:
            table[name]["k_smoothed"] = table[name]["k"] * smoothed[name] / raw[name]
    fp8_linears = quantize_dit(plain, cal.layer_table(), torch.float32, "tensor", scale_dtype=torch.bfloat16)
    layers = len(plain.blocks)
    configs = {}
    for base_name, base in (("attention_only", plain), ("fp8_linears", fp8_linears)):
        configs[f"{base_name}/none"] = (base, "", "plain", None)
        for transform in TRANSFORMS:
            for inputs in (
                ("q", "k", "v", "qkv")
                if transform == "plain"
                else ("qk", "qkv")
                if transform == "rotated"
                else ("k", "qkv")
            ):
                configs[f"{base_name}/{transform}/{inputs}"] = (base, inputs, transform, None)
    for b in range(layers):
        for transform in TRANSFORMS:
            configs[f"attention_only/block{b}/{transform}/qkv"] = (plain, "qkv", transform, {b})

    results = {}
    with torch.inference_mode():
        for name, (base, inputs, transform, blocks) in configs.items():
            dit = probe_dit(base, table, inputs, transform, blocks) if inputs else base
            per_stage = {s: [] for s in KEPT_STEPS}
            for stage, inp, ref in kept:
                per_stage[stage].append(rel_error(dit(*inp), ref))
            flat = [e for v in per_stage.values() for e in v]
            results[name] = {
                "mean": sum(flat) / len(flat),
                "max": max(flat),
                "per_stage_mean": [sum(v) / len(v) for v in per_stage.values()],
            }
            print(f"{name:<44} mean {results[name]['mean']:.5f}  max {results[name]['max']:.5f}", flush=True)
    amax = {
        name: {n: round(rec[n], 4) for n in ("q", "q_rotated", "k", "k_smoothed", "k_rotated", "v")}
        for name, rec in table.items()
        if name.endswith("self_attn")
    }
    for name, rec in amax.items():
        print(name, rec)
    seconds = time.perf_counter() - start
    write_json(
        {
            "note": __doc__.split("\n\n")[1].replace("\n", " "),
            "prompts": list(PROMPTS),
            "seeds": list(SEEDS),
            "kept_steps": {str(s): list(v) for s, v in KEPT_STEPS.items()},
            "calibration_prompts": len(cal.data["prompts"]),
            "velocity_rel_error": results,
            "self_attention_amax": amax,
            "seconds": round(seconds, 1),
        },
        args.out,
    )
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
