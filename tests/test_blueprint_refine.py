"""generate --stop-after K, its state, and refine: the refined video is the uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tempomaster.errors import UsageError
from tempomaster.runtime.jobs import run_generate
from tempomaster.runtime.refine import RefineOptions, run_refine
from tempomaster.runtime.request import GenerateOptions, build_jobs, parse_seeds
from tempomaster.runtime.video import read_video_frames

STEPS = (2, 1, 1)


def _options(out: Path, **kw) -> GenerateOptions:
    base = dict(prompt="a lighthouse at dusk", preset="tiny", steps=STEPS, seed=5, out=out, progress=False, threads=1)
    base.update(kw)
    return GenerateOptions(**base)


@pytest.fixture(scope="module")
def blueprint(tmp_path_factory):
    """A stage-0 state of the tiny preset, and the uninterrupted video of the same request."""
    root = tmp_path_factory.mktemp("blueprint")
    bp = run_generate(_options(root / "bp", stop_after=0), echo=lambda _: None)
    full = run_generate(_options(root / "full"), echo=lambda _: None)
    return root, bp, full


def _copy_state(root: Path, tmp_path: Path) -> Path:
    for name in ("video.state.json", "video.state.safetensors"):
        shutil.copy(root / "bp" / name, tmp_path / name)
    return tmp_path / "video.state.json"


def test_refine_gives_the_uninterrupted_video(blueprint, tmp_path):
    root, bp, full = blueprint
    state = root / "bp" / "video.state.json"
    assert state.is_file() and (root / "bp" / "video.state.safetensors").is_file()
    blueprint_frames, _ = read_video_frames(root / "bp" / "video")
    final, _ = read_video_frames(root / "full" / "video")
    assert blueprint_frames.shape == (17, 64, 96, 3)
    report = run_refine(
        RefineOptions(state=state, out=tmp_path / "refined", progress=False, threads=1), echo=lambda _: None
    )
    refined, _ = read_video_frames(tmp_path / "refined" / "video")
    assert refined.shape == final.shape == (68, 64, 96, 3)
    assert np.array_equal(refined, final)
    # the summary counts only the stages refine ran: 1 + 1 steps, against 2 + 1 + 1
    assert "DiT calls: 2 (the reference makes 4" in report.lines[0]
    assert "stage 0:" not in report.lines[0] and "stage 2:" in report.lines[0]
    assert "DiT calls: 4 (the reference makes 8" in full.lines[0]
    assert "DiT calls: 2 (the reference makes 4" in bp.lines[0]


def test_resume_after_stage_1_equals_uninterrupted_frames():
    """The pipeline seam itself, at stage 1 and in float32: stop after 1, resume, compare every value."""
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.pipeline import StageResume, generate
    from tempomaster.toy.showcase import load_backend

    backend, tokenizer = load_backend("tiny")
    (job,) = build_jobs(_options(Path("unused"), seed=11, guidance=3.0), get_preset("tiny").defaults)
    full = generate(backend, tokenizer, job.request, progress=False)
    first = generate(backend, tokenizer, job.request, progress=False, stop_after=1)
    assert [s.index for s in first.stages] == [0, 1] and first.video.fps == 12
    rest = generate(backend, tokenizer, job.request, progress=False, resume=StageResume(1, first.video.frames))
    assert [s.index for s in rest.stages] == [2]
    assert torch.equal(first.video.frames, full.stages[1].frames)
    assert torch.equal(rest.video.frames, full.video.frames)
    with pytest.raises(ValueError, match=r"expected frames of shape \[3, 34, 64, 96\]"):
        generate(backend, tokenizer, job.request, progress=False, resume=StageResume(1, first.video.frames[:, :-1]))


def _refused(state: Path, tmp_path: Path, match: str, **kw) -> None:
    with pytest.raises(UsageError, match=match):
        run_refine(RefineOptions(state=state, out=tmp_path / "out.mp4", progress=False, **kw), echo=lambda _: None)
    assert not (tmp_path / "out.mp4").exists()


def test_edited_request_is_refused(blueprint, tmp_path):
    state = _copy_state(blueprint[0], tmp_path)
    data = json.loads(state.read_text())
    data["request"]["prompt"] = "a lighthouse at noon"
    state.write_text(json.dumps(data))
    _refused(state, tmp_path, "request was edited")


def test_other_preset_is_refused(blueprint, tmp_path):
    state = _copy_state(blueprint[0], tmp_path)
    _refused(state, tmp_path, r"preset: the state was made with 'tiny', this run has 'toy'", preset="toy")


def test_other_dtype_is_refused(blueprint, tmp_path):
    state = _copy_state(blueprint[0], tmp_path)
    _refused(state, tmp_path, r"dtype: the state was made with 'fp32', this run has 'bf16'", dtype="bf16")


def test_tampered_tensor_file_is_refused(blueprint, tmp_path):
    state = _copy_state(blueprint[0], tmp_path)
    tensors = tmp_path / "video.state.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[-7] ^= 0x01  # one bit of one frame value
    tensors.write_bytes(bytes(blob))
    _refused(state, tmp_path, "tensor hash")


def test_unknown_version_and_shape_are_refused(blueprint, tmp_path):
    state = _copy_state(blueprint[0], tmp_path)
    data = json.loads(state.read_text())
    state.write_text(json.dumps({**data, "format_version": 99}))
    _refused(state, tmp_path, "format version 99: this tm-run reads version 1")
    state.write_text(json.dumps({**data, "tensors": {**data["tensors"], "shape": [3, 16, 64, 96]}}))
    _refused(state, tmp_path, r"shape \[3, 16, 64, 96\]")
    state.write_text('{"format": "something else"}')
    _refused(state, tmp_path, "not a tempomaster-stage-state file")


def test_weights_changed_since_the_state_is_refused(blueprint, tmp_path):
    state = _copy_state(blueprint[0], tmp_path)
    data = json.loads(state.read_text())
    data["model"]["weights_sha256"] = "0" * 64
    state.write_text(json.dumps(data))
    _refused(state, tmp_path, "build/weights hash")


def test_stop_after_bounds_and_foreign_state(tmp_path):
    with pytest.raises(UsageError, match=r"--stop-after 2: the request's stages are 0..2"):
        run_generate(_options(tmp_path / "a", stop_after=2), echo=lambda _: None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "video.state.json").write_text("my notes\n")
    with pytest.raises(UsageError, match="is not a state tm-run wrote"):
        run_generate(_options(tmp_path / "b", stop_after=0), echo=lambda _: None)
    assert (tmp_path / "b" / "video.state.json").read_text() == "my notes\n"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["video.state.json"]


def test_parse_seeds():
    assert parse_seeds("0-7") == tuple(range(8))
    assert parse_seeds("3,1,10") == (3, 1, 10)
    assert parse_seeds("4") == (4,)
    for bad, why in (("7-3", "ends before"), ("a-b", "expected"), ("1,1", "twice"), ("0-99999999", "at most")):
        with pytest.raises(UsageError, match=why):
            parse_seeds(bad)


def test_blueprints_of_prompts_times_seeds_and_contact_sheet(tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n# skipped\na blue square\n")
    out = tmp_path / "bp.gif"
    report = run_generate(
        _options(out, prompt=None, prompts=prompts, seed=0, seeds=(0, 1), stop_after=0, steps=(1, 1, 1)),
        echo=lambda _: None,
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    for label in ("prompt0_seed0", "prompt0_seed1", "prompt1_seed0", "prompt1_seed1"):
        assert f"bp_{label}.gif" in names and f"bp_{label}.state.json" in names
    assert "bp_contact.png" in names
    with Image.open(tmp_path / "bp_contact.png") as sheet:
        assert sheet.info.get("Software") == "tm-run blueprint contact sheet"
        assert sheet.width > 4 * 96 and sheet.height > 64 * 2
    assert len(report.lines) == 4
    states = [json.loads((tmp_path / f"bp_prompt1_seed{s}.state.json").read_text()) for s in (0, 1)]
    assert [s["request"]["seed"] for s in states] == [0, 1]
    assert states[0]["request"]["prompt"] == "a blue square"


def test_a_second_blueprint_replaces_the_first_state(tmp_path):
    """The state and the PNG folder tm-run wrote are its own: the same command again replaces them."""
    for seed in (1, 2):
        run_generate(_options(tmp_path / "bp", seed=seed, stop_after=0, steps=(1, 1, 1)), echo=lambda _: None)
    state = json.loads((tmp_path / "bp" / "video.state.json").read_text())
    assert state["request"]["seed"] == 2
    assert sorted(p.name for p in (tmp_path / "bp").iterdir()) == [
        "video",
        "video.state.json",
        "video.state.safetensors",
    ]


def test_refine_with_a_reference_image_keeps_its_output_size(tmp_path):
    """Only stage 0 reads reference images; the state records the output size they decided (here 48x128)."""
    from PIL import Image

    pixels = np.random.default_rng(4).integers(0, 256, size=(50, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ref.png")
    kw = dict(steps=(1, 1, 1), seed=9, images=[f"0:{tmp_path / 'ref.png'}"])
    run_generate(_options(tmp_path / "bp", stop_after=0, **kw), echo=lambda _: None)
    run_generate(_options(tmp_path / "full", **kw), echo=lambda _: None)
    state = json.loads((tmp_path / "bp" / "video.state.json").read_text())
    assert (state["request"]["height"], state["request"]["width"]) == (48, 128)
    assert state["request"]["reference_images"][0]["rgb_sha256"]
    run_refine(
        RefineOptions(state=tmp_path / "bp" / "video.state.json", out=tmp_path / "refined", progress=False, threads=1),
        echo=lambda _: None,
    )
    refined, _ = read_video_frames(tmp_path / "refined" / "video")
    final, _ = read_video_frames(tmp_path / "full" / "video")
    assert refined.shape == (68, 48, 128, 3) and np.array_equal(refined, final)


def test_blueprints_spread_over_two_ranks_equal_one_process(tmp_path):
    """--devices cpu:2 with two seeds: a video on each rank, states and a contact sheet as one process writes them."""
    from safetensors.torch import load_file

    kw = dict(seed=0, seeds=(3, 4), stop_after=0, steps=(1, 1, 1))
    spread = run_generate(_options(tmp_path / "two" / "bp.mp4", devices="cpu:2", **kw), echo=lambda _: None)
    single = run_generate(_options(tmp_path / "one" / "bp.mp4", **kw), echo=lambda _: None)
    assert len(spread.lines) == len(single.lines) == 2 and all("state:" in line for line in spread.lines)
    for seed in (3, 4):
        a = json.loads((tmp_path / "two" / f"bp_seed{seed}.state.json").read_text())
        b = json.loads((tmp_path / "one" / f"bp_seed{seed}.state.json").read_text())
        assert a["request"] == b["request"] and a["model"] == b["model"] and a["stage"] == b["stage"] == 0
        frames = [load_file(tmp_path / d / f"bp_seed{seed}.state.safetensors")["frames"] for d in ("two", "one")]
        assert frames[0].shape == frames[1].shape
        assert (frames[0] - frames[1]).abs().max().item() <= 2 / 255  # [-1, 1] frames: 1/255 of the uint8 range
    assert (tmp_path / "two" / "bp_contact.png").is_file()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
