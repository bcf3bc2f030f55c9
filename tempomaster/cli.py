"""Command-line entry points. Argument parsing only: every command calls a library function."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from .errors import UsageError  # noqa: E402


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _number_list(flag: str, kind=int, example: str = "4,2,1"):
    """argparse type for comma-separated values, e.g. --steps 50,32,32."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated {noun} such as {example}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag}: expected at least one value")
        return values

    return parse


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) with exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["tiny", "wan-1.3b", "tempomaster-14b"], help="model preset (default: tiny when no checkpoints are given)")
    p.add_argument("--checkpoints", type=Path, help="checkpoint directory in the release's layout")
    p.add_argument("--config", type=Path, help="the release's inference_configs.json")


# ----------------------------------------------------------------------------
# tm-export
# ----------------------------------------------------------------------------

def export_main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="tm-export", description="Export TempoMaster's models: checkpoints -> ONNX -> TensorRT")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    p = sub.add_parser("init-tiny", help="write the tiny preset's checkpoint set in the release's layout")
    p.add_argument("--out", type=Path, required=True, help="new directory to create")
    p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("inspect", help="load all three models and print their sizes")
    _add_model_source(p)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")

    p = sub.add_parser("onnx", help="export the DiT, VAE encoder/decoder and umT5 to ONNX")
    _add_model_source(p)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--intervals", type=_number_list("--intervals"))
    p.add_argument("--out", type=Path, required=True, help="build directory")
    p.add_argument("--opset", type=int, default=23)
    p.add_argument("--random-weights", action="store_true", help="seeded random weights for the preset (no checkpoints; for sizing and tests)")
    p.add_argument("--t5-precision", choices=["fp32", "bf16"], help="precision of the T5 graph (default: fp32 for fp32 builds, else bf16)")
    p.add_argument("--graphs", help="comma-separated subset: dit,vae_encoder_first,vae_encoder,vae_decoder_first,vae_decoder,t5")

    args = parser.parse_args(argv)
    from .models.checkpoints import CheckpointError

    try:
        if args.command == "init-tiny":
            from .models.tiny import TINY_SEED, write_tiny_checkpoints

            out = write_tiny_checkpoints(args.out, seed=TINY_SEED if args.seed is None else args.seed)
            print(f"tiny checkpoint set written to {out} (config: {out / 'inference_configs.json'})")
            return 0
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "onnx":
            from .export.build import export_onnx_from_args

            return export_onnx_from_args(args)
    except (CheckpointError, FileExistsError, UsageError) as err:
        return _fail("tm-export", str(err))
    return 2


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _inspect(args) -> int:
    from .models.sources import load_model_set

    models = load_model_set(args.preset, args.checkpoints, args.config, _dtype(args.dtype))
    for name in ("dit", "vae", "t5"):
        module = getattr(models, name)
        n = sum(p.numel() for p in module.parameters())
        print(f"{name:4s} {n:>15,d} parameters  {module.cfg}")
    print(f"tokenizer: {models.tokenizer}")
    return 0


# ----------------------------------------------------------------------------
# tm-run
# ----------------------------------------------------------------------------

def run_main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="tm-run", description="Generate long videos by next-frame-rate prediction")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    p = sub.add_parser("generate", help="prompt (+ reference images) -> video")
    p.add_argument("--prompt", help="text prompt (required unless --config has inference_cases)")
    p.add_argument("--negative-prompt", default=None, help="default: the release's negative prompt")
    p.add_argument("--image", action="append", default=[], metavar="FRAME:PATH", help="reference image at a stage-0 frame index (repeatable)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int, help="stage-0 frames (rounded up to 4k+1)")
    p.add_argument("--intervals", type=_number_list("--intervals"), help="frame intervals per stage, e.g. 4,2,1")
    p.add_argument("--steps", type=_number_list("--steps", int, "50,32,32"), help="denoising steps per stage, e.g. 50,32,32")
    p.add_argument("--shifts", type=_number_list("--shifts", float, "5,3,3"), help="flow-match shift per stage, e.g. 5,3,3")
    p.add_argument("--guidance", type=float, help="guidance scale (1 = no guidance, one DiT call per step)")
    p.add_argument("--no-apg", action="store_true", help="plain CFG instead of APG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cast-timestep", action="store_true", help="round the timestep to the model dtype as the reference does")
    p.add_argument("--save-stages", action="store_true", help="also write each stage's video")
    p.add_argument("--save-fps", type=float)
    p.add_argument("--engines", type=Path, help="a build directory from tm-export: run its ONNX graphs")
    _add_model_source(p)
    p.add_argument("--out", type=Path, default=Path("out/video.mp4"), help="an .mp4 file or a directory (PNG frames)")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from .runtime.jobs import run_generate

    return run_generate(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_main())
