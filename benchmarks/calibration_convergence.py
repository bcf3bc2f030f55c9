"""How FP8 scales converge with the calibration's size: prompts (1..36) and steps per stage (full, half, quarter).

For each preset (the trained toy, the tiny preset's seeded weights) and each
step budget, calibrates on 36 prompts one video at a time, keeping every
video's own amax of every quantized tensor (the inputs of the block Linears,
q, k and v of every attention) and its time. The amax of the first n videos
is the maximum of their own, so one pass gives every prompt count. Against
the full run (36 prompts, the preset's steps) it reports per (prompts, steps):

- the largest and the mean relative amax change over all tensors;
- the velocity error of the all-FP8 DiT (Linears and self-attention) with
  those scales, ||v_fp8 - v|| / ||v||, on DiT inputs of held-out generations
  (a sample of their steps), beside the full run's own error;
- the calibration's measured time: its videos' seconds of this process's
  CPU time (one thread; unlike wall time, not inflated by other load on the
  machine) and of wall time, same process.

    OMP_NUM_THREADS=1 python -m benchmarks.calibration_convergence [--presets toy,tiny]
        [--out benchmarks/results/calibration_convergence.json] [--png benchmarks/results/calibration_convergence.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_backends import write_json

PROMPT_COUNTS = (1, 2, 4, 8, 16, 36)
STEP_FRACTIONS = {"full": 1.0, "half": 0.5, "quarter": 0.25}
HELD_OUT = 2
SAMPLE_EVERY = 3  # of the held-out generations' DiT calls, every third is a test input


def prompt_sets(preset: str) -> tuple[list[str], list[str]]:
    if preset == "toy":
        from benchmarks.fp8_report_toy import toy_prompt_split

        return toy_prompt_split(36, HELD_OUT)
    from tempomaster.calibration.prompts import BUILTIN_PROMPTS, HELD_OUT_PROMPTS

    return list(BUILTIN_PROMPTS[:36]), list(HELD_OUT_PROMPTS[:HELD_OUT])


def per_video_amax(models, shape, prompts, steps, backend) -> tuple[dict[str, list[float]], list[float], list[float]]:
    """tensor name -> [amax of video 0, video 1, ...] (all stages), and each video's CPU and wall seconds."""
    from tempomaster.calibration.collect import AmaxRecorder
    from tempomaster.calibration.prompts import CalibrationPrompt
    from tempomaster.calibration.trajectory import make_request
    from tempomaster.runtime.pipeline import generate

    amax: dict[str, list[float]] = {}
    seconds, cpu = [], []
    for i, prompt in enumerate(prompts):
        recorder = AmaxRecorder(backend.dit, len(shape.intervals))
        c0 = time.process_time()
        t0 = time.perf_counter()
        try:
            request = make_request(CalibrationPrompt(prompt), shape, models.preset, steps, i)
            generate(
                backend, models.tokenizer, request, progress=False, keep_stages=False, on_step_end=recorder.on_step_end
            )
        finally:
            recorder.remove()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        for name, row in recorder.amax.items():
            amax.setdefault(name, []).append(max(row))
        for name, rows in recorder.attention_amax.items():
            for which, row in rows.items():
                amax.setdefault(f"{name}:{which}", []).append(max(row))
        print(
            f"  video {i + 1}/{len(prompts)} steps {steps}: {cpu[-1]:.1f}s CPU, {seconds[-1]:.1f}s wall",
            file=sys.stderr,
            flush=True,
        )
    return amax, cpu, seconds


def held_out_inputs(models, shape, prompts, backend) -> list[tuple[tuple, torch.Tensor]]:
    """(DiT inputs, unquantized velocity) of every SAMPLE_EVERY-th DiT call of held-out generations."""
    from tempomaster.calibration.prompts import CalibrationPrompt
    from tempomaster.calibration.trajectory import make_request
    from tempomaster.runtime.pipeline import generate

    steps = models.preset.defaults.steps_per_stage[: len(shape.intervals)]
    sample = []
    calls = [0]

    def keep(event):
        if calls[0] % SAMPLE_EVERY == 0:
            sample.append((tuple(t.clone() if torch.is_tensor(t) else t for t in event.inputs), event.velocity.clone()))
        calls[0] += 1

    for i, prompt in enumerate(prompts):
        request = make_request(CalibrationPrompt(prompt), shape, models.preset, steps, 1000 + i)
        generate(backend, models.tokenizer, request, progress=False, keep_stages=False, on_step_end=keep)
    return sample


def velocity_error(dit, amax: dict[str, float], w_amax: dict[str, float], sample, attention: bool) -> float:
    from tempomaster.calibration.fp8 import quantize_dit
    from tempomaster.calibration.report import rel_error

    layers = {n: {"input_amax": amax[n], "weight_amax": w_amax[n]} for n in w_amax}
    att = {}
    for key, value in amax.items():
        if ":" in key:
            name, which = key.split(":")
            att.setdefault(name, {})[which] = value
    q = quantize_dit(
        dit,
        layers,
        torch.float32,
        scale_dtype=torch.bfloat16,
        attention=att,
        attention_kinds=("self_attn",) if attention else (),
    )
    with torch.inference_mode():
        errors = [rel_error(q(*inputs), velocity) for inputs, velocity in sample]
    return sum(errors) / len(errors)


def run_preset(preset: str) -> dict:
    from tempomaster.calibration.collect import weight_amax
    from tempomaster.calibration.cost import scaled_steps
    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.sources import load_model_set
    from tempomaster.runtime.backends.torch import TorchBackend

    models = load_model_set(preset, None, None, torch.float32)
    shape = ExportShape.from_preset(models.preset)
    backend = TorchBackend(models, dtype=torch.float32)
    calib, held = prompt_sets(preset)
    full_steps = tuple(models.preset.defaults.steps_per_stage[: len(shape.intervals)])
    runs = {}
    for label, fraction in STEP_FRACTIONS.items():
        steps = scaled_steps(full_steps, fraction)
        print(f"{preset}: 36 videos at steps {steps}", file=sys.stderr, flush=True)
        amax, cpu, seconds = per_video_amax(models, shape, calib, steps, backend)
        runs[label] = {"steps_per_stage": list(steps), "amax": amax, "cpu_seconds": cpu, "seconds": seconds}
    sample = held_out_inputs(models, shape, held, backend)
    w_amax, _ = weight_amax(models.dit)
    reference = {n: max(v) for n, v in runs["full"]["amax"].items()}
    full_seconds = sum(runs["full"]["seconds"])
    full_cpu = sum(runs["full"]["cpu_seconds"])
    table = []
    for label, run in runs.items():
        for n in PROMPT_COUNTS:
            amax = {name: max(v[:n]) for name, v in run["amax"].items()}
            change = {name: abs(amax[name] - reference[name]) / reference[name] for name in reference}
            linear = [c for name, c in change.items() if ":" not in name]
            attn = [c for name, c in change.items() if ":" in name]
            seconds = sum(run["seconds"][:n])
            cpu = sum(run["cpu_seconds"][:n])
            row = {
                "prompts": n,
                "steps": label,
                "steps_per_stage": run["steps_per_stage"],
                "max_rel_amax_change": max(change.values()),
                "mean_rel_amax_change": sum(change.values()) / len(change),
                "max_rel_amax_change_linear": max(linear),
                "max_rel_amax_change_attention": max(attn),
                "worst_tensor": max(change, key=change.get),
                "velocity_rel_error_all_fp8": velocity_error(models.dit, amax, w_amax, sample, attention=True),
                "cpu_seconds": round(cpu, 2),
                "fraction_of_full_run_cpu_time": round(cpu / full_cpu, 4),
                "seconds": round(seconds, 2),
                "fraction_of_full_run_time": round(seconds / full_seconds, 4),
            }
            table.append(row)
            print(
                f"  {label:7s} {n:2d} prompts: max change {row['max_rel_amax_change']:.3f}  "
                f"velocity err {row['velocity_rel_error_all_fp8']:.5f}  {cpu:.1f}s CPU",
                file=sys.stderr,
                flush=True,
            )
    linear_only = velocity_error(models.dit, reference, w_amax, sample, attention=False)
    return {
        "shape": {
            "height": shape.height,
            "width": shape.width,
            "num_frames": shape.num_frames,
            "intervals": list(shape.intervals),
        },
        "preset_steps_per_stage": list(full_steps),
        "held_out_prompts": held,
        "held_out_dit_inputs": len(sample),
        "tensors": len(reference),
        "full_run_seconds": round(full_seconds, 2),
        "full_run_cpu_seconds": round(full_cpu, 2),
        "velocity_rel_error_fp8_linear_only_full": linear_only,
        "table": table,
        "per_video": {
            label: {
                "amax": run["amax"],
                "cpu_seconds": [round(s, 3) for s in run["cpu_seconds"]],
                "seconds": [round(s, 3) for s in run["seconds"]],
            }
            for label, run in runs.items()
        },
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(results["presets"])
    fig, axes = plt.subplots(2, len(presets), figsize=(5.5 * len(presets), 7.5), squeeze=False)
    for col, preset in enumerate(presets):
        table = results["presets"][preset]["table"]
        for label in STEP_FRACTIONS:
            rows = [r for r in table if r["steps"] == label]
            xs = [r["prompts"] for r in rows]
            (line,) = axes[0][col].plot(
                xs, [100 * r["mean_rel_amax_change"] for r in rows], marker="o", label=f"{label} steps: mean"
            )
            axes[0][col].plot(
                xs,
                [100 * r["max_rel_amax_change"] for r in rows],
                ls=":",
                color=line.get_color(),
                label=f"{label} steps: largest",
            )
            axes[1][col].plot(xs, [r["velocity_rel_error_all_fp8"] for r in rows], marker="o", label=f"{label} steps")
        axes[0][col].axhline(
            100 * results["tolerance"]["mean_rel_amax_change"], color="grey", ls="--", lw=1, label="tolerance (mean)"
        )
        full = next(r for r in table if r["steps"] == "full" and r["prompts"] == 36)["velocity_rel_error_all_fp8"]
        axes[1][col].axhline(
            full * (1 + results["tolerance"]["velocity_error_growth"]), color="grey", ls="--", lw=1, label="tolerance"
        )
        axes[0][col].set_title(f"{preset}: amax change vs 36 prompts, full steps")
        axes[0][col].set_ylabel("relative amax change (%)")
        axes[1][col].set_title(f"{preset}: all-FP8 velocity error, held-out inputs")
        axes[1][col].set_ylabel("||v_fp8 - v|| / ||v||")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(PROMPT_COUNTS, [str(n) for n in PROMPT_COUNTS])
            ax.set_xlabel("calibration prompts")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="toy,tiny")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_convergence.json"))
    p.add_argument("--png", type=Path, default=Path("benchmarks/results/calibration_convergence.png"))
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the presets already in --out that this run does not redo (and their own note on timing)",
    )
    args = p.parse_args(argv)
    from tempomaster.calibration.prompts import CALIB_SETS, CALIB_TOLERANCE

    start = time.perf_counter()
    results = {
        "note": __doc__.split("\n\n")[1].replace("\n", " "),
        "torch_threads": torch.get_num_threads(),
        "tolerance": dict(CALIB_TOLERANCE),
        "calib_sets": {k: {"prompts": v.prompts, "step_fraction": v.step_fraction} for k, v in CALIB_SETS.items()},
        "presets": {},
    }
    if args.keep and args.out.is_file():
        import json

        results["presets"] = json.loads(args.out.read_text())["presets"]
    for preset in args.presets.split(","):
        results["presets"][preset] = run_preset(preset)
        results["seconds_total"] = round(time.perf_counter() - start, 1)
        write_json(results, args.out)
    plot(results, args.png)
    print(f"wrote {args.out} and {args.png} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
