"""`tm-run`: generate videos. Flags become a GenerateOptions and one library call."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..limits import MAX_STEPS_PER_STAGE
from .common import (
    PRESETS,
    SEED_MAX,
    OneLineParser,
    add_backend,
    add_model_source,
    add_shape,
    bounded_int,
    finite_number,
    number_list,
    options_from_flags,
    run_command,
)

PROG = "tm-run"


def _add_request(p: argparse.ArgumentParser) -> None:
    """What a video is: the flags `generate` and `plan` share."""
    p.add_argument("--prompt", help="text prompt (required unless --config has inference_cases, or --prompts)")
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="text file, one prompt per line (# comments): one video each, side by side on groups of devices",
    )
    p.add_argument("--negative-prompt", default=None, help="default: the release's negative prompt")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FRAME:PATH",
        help="reference image at a stage-0 frame index, negative from the end (repeatable)",
    )
    add_shape(p, "to generate")
    p.add_argument(
        "--steps",
        type=number_list("--steps", int, "50,32,32", low=1, high=MAX_STEPS_PER_STAGE),
        help="denoising steps per stage, e.g. 50,32,32",
    )
    p.add_argument(
        "--shifts", type=number_list("--shifts", float, "5,3,3"), help="flow-match shift per stage, e.g. 5,3,3"
    )
    p.add_argument(
        "--guidance",
        type=finite_number(0, low_inclusive=False),
        help="guidance scale (1 = no guidance, one DiT call per step; default 8)",
    )
    p.add_argument("--no-apg", action="store_true", help="plain CFG instead of APG")
    p.add_argument(
        "--seed",
        type=bounded_int(0, SEED_MAX),
        default=0,
        help="noise seed (default 0, as the release's published videos)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="model dtype (default: bf16 on a GPU, fp32 on the CPU; with --engines the build's, and a different value is refused)",
    )
    p.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--threads",
        type=bounded_int(1),
        default=None,
        help="CPU threads for torch and onnxruntime (default: the cores this process may use; on a busy machine 1 is often faster)",
    )
    p.add_argument(
        "--cast-timestep", action="store_true", help="round the timestep to the model dtype as the reference does"
    )
    p.add_argument("--save-stages", action="store_true", help="also write each lower-frame-rate stage's video")
    p.add_argument(
        "--save-fps",
        type=finite_number(0, low_inclusive=False, high=1000),
        help="frame rate of the output (default 24)",
    )
    p.add_argument(
        "--tile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every VAE encode and decode on the release's overlapping tiles (30x52 latent, stride 15x26): "
        "less memory, the release's tiled output (default: the config's inference_configs.tile, else off)",
    )
    add_backend(
        p,
        "torch without --engines; with it tensorrt when the build has plans and this machine a GPU and TensorRT, "
        "else onnxruntime",
    )
    add_model_source(p)
    p.add_argument(
        "--no-sequence-parallel",
        action="store_true",
        help="with several devices: split only chunks and cond/uncond, never a sequence's tokens",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Generate long videos by next-frame-rate prediction")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("generate", help="prompt (+ reference images) -> video")
    _add_request(p)
    p.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="one process per device: CUDA indices 0,1,2,3, or cpu:N for N CPU processes (gloo); "
        "leave out under torchrun",
    )
    p.add_argument(
        "--timeout",
        type=finite_number(0, low_inclusive=False),
        default=600.0,
        help="seconds a rank waits for the others at any exchange (model loading included) before all stop, "
        "naming the rank that died or hangs (default 600)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/video.mp4"),
        help="an .mp4 or .gif file, or a directory: one folder of PNG frames per video, replaced only when tm-run wrote it",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write a torch.profiler Chrome trace (trace.json), breakdown.json and a per-stage bar chart "
        "(stages.png) to DIR; one subdirectory per video when there are several",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_blueprint_flags(p)
    p.add_argument(
        "--cache",
        choices=["off", "safe", "fast"],
        default=None,
        help="step cache (MagCache): skip DiT calls whose output would barely change and reuse the last one; "
        "safe keeps the toy's quality tests and >= 30 dB against the uncached video, fast trades more (default off)",
    )
    p.add_argument(
        "--cache-threshold",
        type=number_list("--cache-threshold", float, "0.05,0.15,0.2", low=0, high=1),
        metavar="A,B,C",
        help="the step cache's accumulated-error bound per stage, in [0, 1] (0: never skip in that stage); "
        "overrides the --cache policy's, or turns the cache on alone",
    )
    p.add_argument(
        "--cache-curves",
        type=Path,
        metavar="FILE",
        help="the model's calibrated magnitude curves (default: magnitude_curves.json beside its weights or in the build)",
    )

    p = sub.add_parser("plan", help="how generate would place its work on N devices, without loading any model")
    _add_request(p)
    p.add_argument("--devices", type=bounded_int(1), default=1, help="number of devices (ranks) to plan for")
    p.add_argument(
        "--forward-seconds",
        type=finite_number(0, low_inclusive=False),
        help="seconds of one DiT forward over one sequence, to project wall time (e.g. from python -m benchmarks)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_refine(sub)
    _add_upsample(sub)

    from .serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def _add_upsample(sub) -> None:
    p = sub.add_parser(
        "upsample", help="lift a video's frame rate: its frames become a stage's, the later stages fill in"
    )
    p.add_argument(
        "--video",
        type=Path,
        required=True,
        help="the video to lift (anything ffmpeg reads); resized and cropped to the model's shape as reference images are",
    )
    p.add_argument(
        "--to-fps",
        type=finite_number(0, low_inclusive=False),
        default=None,
        help="a stage rate above the input's, e.g. 12 or 24 (default: the last stage's)",
    )
    _add_request(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/upsampled.mp4"),
        help="an .mp4 or .gif file, or a directory for PNG frames",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_blueprint_flags(p: argparse.ArgumentParser) -> None:
    """generate: stop after a stage (a blueprint to refine later), one video per seed."""
    p.add_argument(
        "--stop-after",
        type=bounded_int(0),
        default=None,
        metavar="K",
        help="stop after stage K (0 = the 6 fps blueprint): write its video at --out and a state beside it "
        "(NAME.state.json + NAME.state.safetensors) that tm-run refine finishes",
    )
    p.add_argument("--blueprint-only", action="store_true", help="the same as --stop-after 0")
    p.add_argument(
        "--seeds",
        default=None,
        metavar="A-B|A,B,C",
        help="one video per prompt and seed (instead of --seed); with --stop-after and several videos, "
        "a contact sheet PNG of their middle frames is written beside them",
    )


def _add_refine(sub) -> None:
    p = sub.add_parser("refine", help="run the remaining stages of a state written by generate --stop-after")
    p.add_argument("state", type=Path, help="NAME.state.json")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="an .mp4 or .gif file, or a directory for PNG frames (default: NAME_refined.mp4 beside the state)",
    )
    p.add_argument("--save-stages", action="store_true", help="also write each stage this run makes before the last")
    p.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--threads", type=bounded_int(1), default=None, help="CPU threads (default: the cores this process may use)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the state's (another is refused)")
    p.add_argument("--engines", type=Path, help="default: the state's build, if it named one")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default=None, help="default: the state's")
    p.add_argument("--tile", action=argparse.BooleanOptionalAction, default=None, help="default: the state's")
    add_model_source(p)


def _options(args):
    from ..runtime.request import GenerateOptions

    return GenerateOptions(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        images=args.image,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        intervals=args.intervals,
        steps=args.steps,
        shifts=args.shifts,
        guidance=args.guidance,
        use_apg=False if args.no_apg else None,
        save_fps=args.save_fps,
        seed=args.seed,
        dtype=args.dtype,
        cast_timestep=args.cast_timestep,
        save_stages=args.save_stages,
        engines=args.engines,
        preset=args.preset,
        checkpoints=args.checkpoints,
        config=args.config,
        out=getattr(args, "out", Path("out/video.mp4")),
        progress=not getattr(args, "no_progress", True),
        device=args.device,
        threads=args.threads,
        backend=args.backend,
        cuda_graphs=args.cuda_graphs,
        weight_streaming_budget=args.weight_streaming_budget,
        tile=args.tile,
        prompts=args.prompts,
        sequence_parallel=not args.no_sequence_parallel,
        devices=getattr(args, "devices", None) if args.command == "generate" else None,
        timeout=getattr(args, "timeout", 600.0),
        profile=getattr(args, "profile", None),
        **_blueprint_options(args),
        cache=getattr(args, "cache", None),
        cache_thresholds=getattr(args, "cache_threshold", None),
        cache_curves=getattr(args, "cache_curves", None),
    )


def _blueprint_options(args) -> dict:
    from ..runtime.request import parse_seeds

    stop_after = getattr(args, "stop_after", None)
    if getattr(args, "blueprint_only", False):
        if stop_after not in (None, 0):
            from ..errors import UsageError

            raise UsageError(f"--blueprint-only is --stop-after 0; got --stop-after {stop_after} as well")
        stop_after = 0
    seeds = getattr(args, "seeds", None)
    return {"stop_after": stop_after, "seeds": parse_seeds(seeds) if seeds is not None else None}


def _generate(args) -> int:
    from ..runtime.jobs import run_generate

    run_generate(_options(args))
    return 0


def _plan(args) -> int:
    import json

    from ..parallel_plan import format_schedule
    from ..runtime.jobs import plan_request

    options = _options(args)
    if options.prompt is None and options.prompts is None and options.config is None:
        options.prompt = "(any prompt: the plan does not depend on it)"
    plan = plan_request(options, args.devices, args.forward_seconds)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_schedule(plan))
    if not args.json and options.sequence_parallel and not plan.sequence_parallel:
        print(
            "sequence parallel off: engine backends (onnxruntime, tensorrt) place whole sequences on ranks; "
            "the idle column is the time ranks wait"
        )
    return 0


def _refine(args) -> int:
    from ..runtime.refine import RefineOptions, run_refine

    run_refine(options_from_flags(RefineOptions, args, progress=not args.no_progress))
    return 0


def _upsample(args) -> int:
    from ..errors import UsageError
    from ..runtime.upsample import UpsampleOptions, run_upsample

    if args.num_frames is not None:
        raise UsageError("upsample: --num-frames is the video's own (its frames at the stage rate, 4k + 1 kept)")
    if args.prompt is None:
        raise UsageError("upsample: --prompt is required (what the video shows)")
    run_upsample(UpsampleOptions(video=args.video, to_fps=args.to_fps, generate=_options(args)))
    return 0


def _serve(args) -> int:
    from .serve import serve

    return serve(args)


COMMANDS = {"generate": _generate, "plan": _plan, "refine": _refine, "upsample": _upsample, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: COMMANDS[args.command](args))


__all__ = ["main", "build_parser", "PRESETS"]
