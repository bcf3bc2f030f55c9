"""Calibration sets and their projected cost (calibration.cost), against figures derived by hand."""

import json
from pathlib import Path

import pytest

from tempomaster.errors import UsageError


def test_calib_sets_resolve():
    from tempomaster.calibration.collect import resolve_calib_set, resolve_prompts, resolve_steps
    from tempomaster.calibration.prompts import BUILTIN_PROMPTS
    from tempomaster.models.presets import get_preset

    tiny = get_preset("tiny")
    name, small = resolve_calib_set(None)
    assert name == "small"
    prompts, source = resolve_prompts(None, small.prompts)
    assert [p.prompt for p in prompts] == list(BUILTIN_PROMPTS[: small.prompts]) and source["count"] == small.prompts
    assert resolve_steps(None, tiny, 3, small.step_fraction) == (2, 1, 1)  # a quarter of (6, 4, 4), rounded up
    _, full = resolve_calib_set("full")
    assert len(resolve_prompts(None, full.prompts)[0]) == 36 and resolve_steps(None, tiny, 3, full.step_fraction) == (
        6,
        4,
        4,
    )
    assert resolve_steps(3, tiny, 3, small.step_fraction) == (3, 3, 3)  # explicit steps win
    with pytest.raises(UsageError, match="--calib-set: 'tiny' is not one of small, full"):
        resolve_calib_set("tiny")


def test_projection_on_14b():
    from tempomaster.calibration.cost import GPU_EFFICIENCY, GPU_PEAK_FLOPS, calibration_cost, scaled_steps
    from tempomaster.calibration.prompts import CALIB_SETS
    from tempomaster.models.presets import get_preset

    p = get_preset("tempomaster-14b")
    full = calibration_cost(p, videos=36)
    # README's `tm-run plan` figure: 484 forwards of one sequence per video at the release defaults
    assert full.forwards_per_video == 484
    # by hand, one sequence of 28 latent frames at 60x104 latents: L = 28*30*52 tokens, T = 512
    L, T, d, f, layers = 28 * 30 * 52, 512, 5120, 13824, 40
    block = 2 * (6 * L * d * d + 2 * T * d * d + 2 * L * d * f) + 4 * L * L * d + 4 * L * T * d
    embed = 2 * L * 36 * 4 * d + 2 * T * 4096 * d + 2 * T * d * d + 2 * (256 * d + d * d + 6 * d * d)
    head = 2 * L * d * 16 * 4
    per_sequence = layers * block + embed + head
    stage_steps = (50, 32, 32)
    # not every stage has 28-frame sequences; the 28-frame stage bounds the total from above
    assert full.flops_per_video <= 484 * per_sequence
    assert full.flops_per_video >= 0.5 * 484 * per_sequence
    hours = full.gpu_seconds() / 3600
    assert hours == pytest.approx(full.flops / (GPU_PEAK_FLOPS * GPU_EFFICIENCY) / 3600)
    assert hours > 24  # "roughly a day of GPU time"
    small_set = CALIB_SETS["small"]
    small = calibration_cost(
        p, videos=small_set.prompts, steps_per_stage=scaled_steps(stage_steps, small_set.step_fraction)
    )
    assert small.gpu_seconds() < 3600  # the goal: the default set under one GPU-hour on the 14B model
    assert "GPU-hours projected (H100 dense BF16 989 TFLOP/s x 40% efficiency)" in small.describe()


def test_cli_fp8_attention_flags():
    from tempomaster.cli.export import _fp8_options, build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "onnx",
            "--precision",
            "fp8",
            "--out",
            "b",
            "--fp8-attention",
            "on",
            "--fp8-cross-attention",
            "on",
            "--calib-set",
            "full",
        ]
    )
    opts = _fp8_options(args)
    assert opts.attention is True and opts.cross_attention is True and opts.calib_set == "full"
    defaults = _fp8_options(parser.parse_args(["build", "--precision", "fp8", "--out", "b"]))
    # FP8 self-attention on by default: the toy report keeps every prompt with it (benchmarks/results)
    assert defaults.calib_set == "small" and defaults.attention is True and defaults.cross_attention is False
    off = _fp8_options(parser.parse_args(["build", "--precision", "fp8", "--out", "b", "--fp8-attention", "off"]))
    assert off.attention is False
    # the rule behind the default, read off the stored report
    report = json.loads((Path(__file__).parents[1] / "benchmarks/results/fp8_report_toy.json").read_text())
    assert report["pass_unquantized"] and report["kept"]["all_fp8"]["lost"] == []
    for flags in (
        ["--fp8-attention", "on"],
        ["--fp8-attention", "off"],
        ["--fp8-cross-attention", "on"],
        ["--calib-set", "full"],
    ):
        with pytest.raises(UsageError, match=f"{flags[0]}: only with --precision fp8"):
            _fp8_options(parser.parse_args(["onnx", "--precision", "bf16", "--out", "b", *flags]))
