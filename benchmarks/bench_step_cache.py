"""Step cache (MagCache) measured on the trained toy: DiT calls saved, wall time, PSNR and the toy's quality.

At the release's step counts ([50, 32, 32]), on the toy quality tests'
prompts (the first N of the seeded shuffle of the caption grid, seed i for
prompt i), every policy runs beside the uncached video of the same prompt in
the same process: `off`, a threshold sweep of each stage alone (the other
stages uncached), and the chosen `safe` and `fast`. Per run: DiT calls made
per stage, wall time against `off`, PSNR of the final video against the
uncached one, and the quality tests' measures (colour found, blueprint kept,
sliding prompts moving the asked way, largest centroid step). The skip plan
is a function of the calibrated curve and the schedule alone, so thresholds
that give the same plan as a smaller one are measured once.

    python -m benchmarks.bench_step_cache --calibrate   # the toy's curves -> tempomaster/toy/weights/magnitude_curves.json
    python -m benchmarks.bench_step_cache [--prompts 6]  # -> benchmarks/results/step_cache_toy.json + .png
    python -m benchmarks.bench_step_cache --wan13        # wan-1.3b-shaped random weights: calls saved + PSNR

The calibration runs on held-out prompts (the shuffle's entries after the
measured ones, other seeds), uncached, at the same step counts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_backends import write_json

RELEASE_STEPS = (50, 32, 32)
# (threshold, max skips) per stage alone: the toy's magnitude curve is within 1% of 1 for most
# steps, so beyond ~0.02 the bound on consecutive skips decides more than the threshold does.
SWEEP = ((0.01, 2), (0.08, 2), (0.02, 4), (0.08, 4))
RESULTS = Path("benchmarks/results")
# The toy quality tests' bounds (tests/test_toy_quality.py).
PRESENCE_BOUND, PRESENCE_PROMPTS, JUMP_BOUND_PX, BLUEPRINT_PSNR_DB = 0.9, 3, 6.0, 20.0
SAFE_PSNR_DB = 30.0


def shuffled_captions() -> list[str]:
    from tempomaster.toy.clips import all_captions

    captions = all_captions()
    return [captions[i] for i in np.random.default_rng(11).permutation(len(captions))]


def toy_request(prompt: str, seed: int, steps, preset: str = "toy"):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import GenerateOptions, build_jobs

    (job,) = build_jobs(
        GenerateOptions(prompt=prompt, seed=seed, steps=steps, preset=preset), get_preset(preset).defaults
    )
    return job.request


def calibrate(backend, tokenizer, requests, log=print):
    from tempomaster.runtime.pipeline import generate
    from tempomaster.runtime.step_cache import MagnitudeRecorder

    recorder = MagnitudeRecorder(branches=2 if requests[0].guidance_scale != 1.0 else 1)
    for r in requests:
        start = time.perf_counter()
        generate(backend, tokenizer, r, progress=False, keep_stages=False, on_step_end=recorder)
        log(f"calibrated on {r.prompt!r} (seed {r.seed}) in {time.perf_counter() - start:.1f} s")
    return recorder.curves()


def run(backend, tokenizer, request):
    from tempomaster.runtime.pipeline import generate
    from tempomaster.runtime.video import to_uint8_frames

    start = time.perf_counter()
    result = generate(backend, tokenizer, request, progress=False, keep_stages=True)
    seconds = time.perf_counter() - start
    return result, seconds, to_uint8_frames(result.video.frames)


def quality_row(result, prompt: str) -> dict:
    from tempomaster.toy.quality import measure_generation

    q = measure_generation(result, prompt)
    return {
        "presence": q.presence,
        "blueprint_psnr": float(q.blueprint_psnr),
        "max_jump": q.max_jump,
        "follows_motion": q.follows_motion,
        "motion": q.motion,
    }


def tests_passed(rows: list[dict]) -> dict:
    """Each toy quality test's verdict over the prompts' rows (the test file's own predicates)."""
    sliding = [r for r in rows if r["follows_motion"] is not None]
    return {
        "present": sum(r["presence"] >= PRESENCE_BOUND for r in rows) >= min(PRESENCE_PROMPTS, len(rows)),
        "blueprint": all(r["blueprint_psnr"] >= BLUEPRINT_PSNR_DB for r in rows),
        "smooth": all(not math.isnan(r["max_jump"]) and r["max_jump"] <= JUMP_BOUND_PX for r in rows),
        "motion": (all(r["follows_motion"] for r in sliding) if sliding else None),
    }


def policies(curves, sweep=SWEEP, extra: dict | None = None, stages=3):
    """(name, policy or None) to measure: off, each stage's sweep (deduplicated by plan), the named ones.

    extra: name -> (thresholds, max_skips).
    """
    from tempomaster.runtime.schedule import StageSchedule
    from tempomaster.runtime.step_cache import StepCachePolicy

    out = [("off", None)]
    sigmas = [StageSchedule.create(n, s).sigmas.tolist() for n, s in zip(RELEASE_STEPS, (5.0, 3.0, 3.0))]
    for stage in range(stages):
        seen = set()
        for t, k in sweep:
            thresholds = tuple(t if s == stage else 0.0 for s in range(stages))
            policy = StepCachePolicy(thresholds, tuple(curves), max_skips=k)
            plan = policy.plan(stage, sigmas[stage], guided=True)
            if plan in seen or not any(plan):
                continue
            seen.add(plan)
            out.append((f"stage{stage}@{t:g}/K{k}", policy))
    for name, (thresholds, k) in (extra or {}).items():
        out.append((name, StepCachePolicy(tuple(thresholds), tuple(curves), max_skips=k, name=name)))
    return out


def psnr(a, b) -> float:
    from tempomaster.toy.quality import psnr as _psnr

    return _psnr(a, b)


def sweep_toy(args) -> dict:
    from tempomaster.models.presets import get_preset, packaged_weights_dir
    from tempomaster.runtime.step_cache import POLICY_MAX_SKIPS, POLICY_THRESHOLDS, load_curves
    from tempomaster.toy.showcase import load_backend

    backend, tokenizer = load_backend("toy")
    curves = load_curves(args.curves or packaged_weights_dir(get_preset("toy")) / "magnitude_curves.json")
    extra = {k: (v, POLICY_MAX_SKIPS[k]) for k, v in POLICY_THRESHOLDS.items()}
    for spec in args.candidate or ():  # NAME=A,B,C/K
        name, _, values = spec.partition("=")
        values, _, k = values.partition("/")
        extra[name] = (tuple(float(v) for v in values.split(",")), int(k or 2))
    todo = (
        policies(curves, extra=extra)
        if not args.only_named
        else [("off", None)] + [p for p in policies(curves, sweep=(), extra=extra)[1:]]
    )
    prompts = shuffled_captions()[args.first_prompt : args.first_prompt + args.prompts]
    rows: dict[str, list] = {name: [] for name, _ in todo}
    for i, prompt in enumerate(prompts, start=args.first_prompt):
        base = toy_request(prompt, i, RELEASE_STEPS)
        ref_frames, ref_seconds = None, None
        for name, policy in todo:
            result, seconds, frames = run(backend, tokenizer, replace(base, step_cache=policy))
            if policy is None:
                ref_frames, ref_seconds = frames, seconds
            row = {
                "prompt": prompt,
                "seed": i,
                "seconds": seconds,
                "time_ratio": seconds / ref_seconds,
                "dit_calls": [s.dit_calls for s in result.stages],
                "dit_skipped": [s.dit_skipped for s in result.stages],
                "psnr_vs_off": psnr(frames, ref_frames),
                **quality_row(result, prompt),
            }
            rows[name].append(row)
            print(
                f"[{i}] {name:14s} calls {sum(row['dit_calls']):3d} {row['dit_calls']} {seconds:5.1f} s "
                f"x{row['time_ratio']:.2f} psnr {row['psnr_vs_off']:.1f} jump {row['max_jump']:.1f} "
                f"bp {row['blueprint_psnr']:.1f} pres {row['presence']:.2f}",
                flush=True,
            )
    meta = {
        name: {
            "thresholds": list(policy.thresholds) if policy else None,
            "max_skips": policy.max_skips if policy else None,
        }
        for name, policy in todo
    }
    return {
        "note": __doc__.split("\n\n")[1].replace("\n", " "),
        "steps": list(RELEASE_STEPS),
        "prompts": prompts,
        "summary": summarise(rows, meta),
        "runs": rows,
    }


def summarise(rows: dict, meta: dict) -> dict:
    """Per policy: calls, worst and mean PSNR against off, the quality tests' verdicts, and whether it is safe."""
    summary = {}
    for name, r in rows.items():
        calls = sum(r[0]["dit_calls"])
        summary[name] = {
            **meta[name],
            "dit_calls": r[0]["dit_calls"],
            "dit_calls_total": calls,
            "fewer_calls": sum(RELEASE_STEPS) / calls,
            "time_ratio_mean": float(np.mean([x["time_ratio"] for x in r])),
            "psnr_vs_off_min": float(min(x["psnr_vs_off"] for x in r)),
            "psnr_vs_off_mean": float(
                np.mean([x["psnr_vs_off"] if math.isfinite(x["psnr_vs_off"]) else 99.0 for x in r])
            ),
            "max_jump_max": float(max(x["max_jump"] for x in r)),
            "tests": tests_passed(r),
        }
    off_tests = summary["off"]["tests"]
    for s in summary.values():
        keeps = all(s["tests"][k] == v or not v for k, v in off_tests.items())
        s["safe"] = bool(keeps and s["psnr_vs_off_min"] >= SAFE_PSNR_DB)
    return summary


def merge(paths: list[Path]) -> dict:
    """One result from runs over different prompts (e.g. the sweep on some prompts, the named policies on the rest).

    Policies measured in every file are summarised over all their prompts; sweep points measured in
    only some are summarised apart ("sweep_summary"), against `off` on the same prompts.
    """
    import json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    everywhere = [n for n in parts[0]["runs"] if all(n in part["runs"] for part in parts)]
    meta = {
        n: {k: v for k, v in part["summary"][n].items() if k in ("thresholds", "max_skips")}
        for part in parts
        for n in part["summary"]
    }
    rows = {n: [row for part in parts for row in part["runs"][n]] for n in everywhere}
    data = {
        **parts[0],
        "prompts": [p for part in parts for p in part["prompts"]],
        "summary": summarise(rows, meta),
        "runs": rows,
    }
    partial = {n: part["runs"][n] for part in parts for n in part["runs"] if n not in everywhere}
    if partial:
        prompts = {r["prompt"] for rs in partial.values() for r in rs}
        off = [r for r in rows["off"] if r["prompt"] in prompts]
        data["sweep_prompts"] = sorted(prompts)
        data["sweep_summary"] = {k: v for k, v in summarise({"off": off, **partial}, meta).items() if k != "off"}
        data["sweep_runs"] = partial
    return data


def alternate_timing(backend, tokenizer, curves, repeats: int) -> dict:
    """Wall time of off, safe and fast on one prompt, alternated `repeats` times: the median ratio against off."""
    from tempomaster.runtime.step_cache import POLICY_MAX_SKIPS, POLICY_THRESHOLDS, StepCachePolicy

    base = toy_request(shuffled_captions()[0], 0, RELEASE_STEPS)
    named = {
        "off": None,
        **{
            n: StepCachePolicy(t, tuple(curves), max_skips=POLICY_MAX_SKIPS[n], name=n)
            for n, t in POLICY_THRESHOLDS.items()
        },
    }
    seconds = {n: [] for n in named}
    dit_seconds = {n: [] for n in named}
    for _ in range(repeats):
        for name, policy in named.items():
            result, wall, _ = run(backend, tokenizer, replace(base, step_cache=policy))
            seconds[name].append(wall)
            dit_seconds[name].append(result.backend_seconds)
    ratios = {n: float(np.median([a / b for a, b in zip(seconds[n], seconds["off"])])) for n in named}
    return {"repeats": repeats, "seconds": seconds, "backend_seconds": dit_seconds, "median_time_ratio": ratios}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    total = sum(data["steps"])
    colours = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}
    for name, s in {**data.get("sweep_summary", {}), **data["summary"]}.items():
        saved = 1 - s["dit_calls_total"] / total
        psnr_min = min(s["psnr_vs_off_min"], 60.0)
        if name.startswith("stage"):
            stage = int(name[5])  # "stageS@T/KK"
            kw = dict(color=colours[stage], marker="o", label=f"stage {stage} alone")
        elif name == "off":
            continue
        else:
            kw = dict(color="black", marker="*", markersize=12, label=name)
        axes[0].plot([saved], [psnr_min], linestyle="none", **kw)
        axes[1].plot([saved], [s["max_jump_max"]], linestyle="none", **kw)
        if not name.startswith("stage"):
            for ax, y in ((axes[0], psnr_min), (axes[1], s["max_jump_max"])):
                ax.annotate(name, (saved, y), textcoords="offset points", xytext=(5, 5))
    axes[0].axhline(SAFE_PSNR_DB, color="grey", linestyle="--", linewidth=1)
    axes[1].axhline(JUMP_BOUND_PX, color="grey", linestyle="--", linewidth=1)
    axes[1].axhline(data["summary"]["off"]["max_jump_max"], color="grey", linestyle=":", linewidth=1)
    axes[0].set(
        xlabel="share of the 114 DiT calls skipped",
        ylabel="PSNR vs uncached, worst prompt (dB)",
        title="final video vs the uncached one",
    )
    axes[1].set(
        xlabel="share of the 114 DiT calls skipped",
        ylabel="largest centroid step, worst prompt (px)",
        title="toy smoothness (bound 6 px; dotted: uncached)",
    )
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"step cache on the toy at steps {data['steps']}, {len(data['prompts'])} prompts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def wan13(args) -> dict:
    """wan-1.3b's DiT shape on seeded random weights at a tiny frame size: calls saved and PSNR only."""
    from tempomaster.export.source import random_model_set
    from tempomaster.models.checkpoints import ModelSet
    from tempomaster.models.presets import T5Config, get_preset
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.tokenizer import tiny_tokenizer
    from tempomaster.models.vae import WanVAE
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import GenerationRequest
    from tempomaster.runtime.step_cache import POLICY_MAX_SKIPS, POLICY_THRESHOLDS, StepCachePolicy

    torch.manual_seed(0)
    base = get_preset("wan-1.3b")
    # a one-layer T5 of umT5-XXL's output width stands in for the 5.7B-parameter encoder (as fp8_report_wan13)
    t5_cfg = T5Config(vocab_size=384, dim=4096, dim_attn=256, dim_ffn=256, num_heads=4, num_layers=1)
    dit = random_model_set(base, torch.float32, torch.float32, graphs=["dit"]).dit
    models = ModelSet(
        preset=replace(base, t5=t5_cfg),
        dit=dit,
        vae=WanVAE(base.vae).eval(),
        t5=UMT5Encoder(t5_cfg).eval(),
        tokenizer=tiny_tokenizer(),
    )
    backend, tokenizer = TorchBackend(models), models.tokenizer
    steps = tuple(int(s) for s in args.wan13_steps.split(","))
    shape = dict(height=16, width=16, num_frames=5, steps_per_stage=steps, shift_per_stage=(5.0, 3.0, 3.0))
    calib = [GenerationRequest(prompt="a boat on a lake", seed=100, **shape)]
    curves = calibrate(backend, tokenizer, calib)
    base_request = GenerationRequest(prompt="a red ball bouncing", seed=0, **shape)
    out = {
        "note": wan13.__doc__,
        "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
        "summary": {},
    }
    ref, ref_seconds, ref_frames = run(backend, tokenizer, base_request)
    out["summary"]["off"] = {"dit_calls": [s.dit_calls for s in ref.stages], "seconds": ref_seconds}
    for name, thresholds in POLICY_THRESHOLDS.items():
        policy = StepCachePolicy(thresholds, tuple(curves), max_skips=POLICY_MAX_SKIPS[name], name=name)
        result, seconds, frames = run(backend, tokenizer, replace(base_request, step_cache=policy))
        out["summary"][name] = {
            "thresholds": list(thresholds),
            "dit_calls": [s.dit_calls for s in result.stages],
            "fewer_calls": sum(steps) / result.dit_calls,
            "time_ratio": seconds / ref_seconds,
            "psnr_vs_off": psnr(frames, ref_frames),
        }
        print(name, out["summary"][name], flush=True)
    out["curves_gamma"] = [np.exp(np.asarray(c.log_gammas)).round(4).tolist() for c in curves]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibrate", action="store_true", help="measure the toy's magnitude curves and write them")
    p.add_argument("--calibration-prompts", type=int, default=3)
    p.add_argument("--curves", type=Path, default=None, help="curves file to read or (--calibrate) write")
    p.add_argument(
        "--prompts", type=int, default=6, help="how many of the quality tests' prompts (at most 6 are the tests')"
    )
    p.add_argument(
        "--candidate",
        action="append",
        metavar="NAME=A,B,C/K",
        help="another policy to measure (thresholds per stage / max skips)",
    )
    p.add_argument("--only-named", action="store_true", help="off and the named policies only (no sweep)")
    p.add_argument("--wan13", action="store_true", help="wan-1.3b-shaped random weights instead of the toy")
    p.add_argument("--wan13-steps", default="50,32,32")
    p.add_argument("--first-prompt", type=int, default=0, help="start at this prompt of the shuffle (to split a run)")
    p.add_argument("--merge", type=Path, nargs="+", help="combine these result files into --out (and its plot)")
    p.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="R",
        help="also time off/safe/fast alternated R times on the first prompt (the robust speed-up)",
    )
    p.add_argument(
        "--timing-json", type=Path, help="a timing result (alternate_timing) measured apart, to store with --merge"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.calibrate:
        from tempomaster.models.presets import get_preset, packaged_weights_dir
        from tempomaster.runtime.step_cache import save_curves
        from tempomaster.toy.showcase import load_backend

        backend, tokenizer = load_backend("toy")
        held_out = shuffled_captions()[6 : 6 + args.calibration_prompts]
        requests = [toy_request(prompt, 100 + i, RELEASE_STEPS) for i, prompt in enumerate(held_out)]
        curves = calibrate(backend, tokenizer, requests)
        path = args.curves or packaged_weights_dir(get_preset("toy")) / "magnitude_curves.json"
        save_curves(
            path,
            curves,
            {
                "prompts": held_out,
                "seeds": [r.seed for r in requests],
                "steps": list(RELEASE_STEPS),
                "shifts": list(requests[0].shift_per_stage),
                "guidance": requests[0].guidance_scale,
                "dtype": "fp32",
            },
        )
        print(f"wrote {path}")
        return 0
    if args.wan13:
        data = wan13(args)
        write_json(data, args.out or RESULTS / "step_cache_wan-1.3b.json")
        return 0
    out = args.out or RESULTS / "step_cache_toy.json"
    if args.merge:
        data = merge(args.merge)
    else:
        data = sweep_toy(args)
    if args.timing_json:
        import json

        data["timing"] = json.loads(args.timing_json.read_text())
    if args.timing:
        from tempomaster.models.presets import get_preset, packaged_weights_dir
        from tempomaster.runtime.step_cache import load_curves
        from tempomaster.toy.showcase import load_backend

        backend, tokenizer = load_backend("toy")
        curves = load_curves(args.curves or packaged_weights_dir(get_preset("toy")) / "magnitude_curves.json")
        data["timing"] = alternate_timing(backend, tokenizer, curves, args.timing)
        print("median wall-time ratio vs off:", data["timing"]["median_time_ratio"])
    write_json(data, out)
    plot(data, out.with_suffix(".png"))
    for name, s in {**data.get("sweep_summary", {}), **data["summary"]}.items():
        print(
            f"{name:14s} {s['dit_calls']} {s['fewer_calls']:.2f}x fewer, time x{s['time_ratio_mean']:.2f}, "
            f"PSNR min {s['psnr_vs_off_min']:.1f} dB, jump {s['max_jump_max']:.1f} px, tests {s['tests']}, safe {s['safe']}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
