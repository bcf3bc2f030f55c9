"""A request is bounded before any work: huge numbers, endless prompt files, image bombs and broken configs are one line, at once."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tempomaster.cli import run_main
from tempomaster.limits import MAX_REFERENCE_PIXELS, MAX_STEPS_PER_STAGE, MAX_VIDEO_FRAMES

BIN = Path(sys.executable).parent
GIB = 2**30


def _exit_code(args) -> int:
    try:
        return run_main(args)
    except SystemExit as exit_:
        return exit_.code


def _refused(capsys, args, *needles, workdir: Path) -> str:
    before = sorted(workdir.rglob("*"))
    assert _exit_code(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert sorted(workdir.rglob("*")) == before  # nothing written
    return err


@pytest.fixture
def no_work(monkeypatch):
    """No model loads, and no stage of a request past the bounds is planned (planning is what costs GBs)."""
    import tempomaster.planner as planner
    import tempomaster.runtime.jobs as jobs

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))
    real = planner.plan_stages

    def bounded(num_frames, intervals, *args, **kwargs):
        if num_frames * intervals[0] // intervals[-1] > 10_000:
            pytest.fail(f"a {num_frames}-frame request was planned before it was refused")
        return real(num_frames, intervals, *args, **kwargs)

    import tempomaster.parallel_plan as parallel_plan

    for module in (planner, parallel_plan):
        monkeypatch.setattr(module, "plan_stages", bounded)


@pytest.fixture
def eight_gib(monkeypatch):
    """The host has 8 GiB available, whatever this machine has: the refusals below do not depend on it."""
    import tempomaster.runtime.memory as memory

    monkeypatch.setattr(memory, "available_host_bytes", lambda: 8 * GIB)


# ----------------------------------------------------------------------------
# Numbers: frames, intervals, steps
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_a_huge_frame_count_is_refused_before_it_is_planned(command, tmp_path, capsys, no_work):
    out = ["--out", str(tmp_path / "v.mp4")] if command == "generate" else []
    _refused(
        capsys,
        [command, "--prompt", "x", "--num-frames", "100000000", *out],
        "--num-frames",
        str(MAX_VIDEO_FRAMES),
        workdir=tmp_path,
    )
    # under the flag's bound, but the finished video (x4 for 4,2,1; x1024 for 1024,1) is past it
    _refused(
        capsys,
        [command, "--prompt", "x", "--num-frames", "300000", *out],
        "--num-frames",
        str(MAX_VIDEO_FRAMES),
        workdir=tmp_path,
    )
    _refused(
        capsys,
        [
            command,
            "--prompt",
            "x",
            "--num-frames",
            "2000",
            "--intervals",
            "1024,1",
            "--steps",
            "2,2",
            "--shifts",
            "3,3",
            *out,
        ],
        "--intervals 1024,1",
        str(MAX_VIDEO_FRAMES),
        workdir=tmp_path,
    )


def test_a_video_past_the_memory_is_refused_by_arithmetic_first(tmp_path, capsys, no_work, eight_gib):
    # 200000 stage-0 frames -> 800004 frames of 96x64: 55 GiB of float32 frames, refused before planning
    err = _refused(
        capsys,
        ["generate", "--prompt", "x", "--num-frames", "200000", "--out", str(tmp_path / "v.mp4")],
        "--num-frames 200000",
        "GiB of host memory",
        "8.0 GiB is available",
        workdir=tmp_path,
    )
    frames = 8 * GIB // (3 * 64 * 96 * 4)
    assert f"at most {(frames - 1) // 4}" in err


@pytest.mark.parametrize(
    "flag, value, bound",
    [
        ("--steps", "99999999999999999999,2,2", "at most 1000"),
        ("--steps", "2,1001,2", "at most 1000"),
        ("--steps", "2,0,2", "at least 1 and at most 1000"),
        ("--intervals", "99999999999999999999,1", "at most 1024"),
        ("--height", "99999999999999999984", "at most 65536"),
    ],
)
def test_numbers_past_their_bound_are_refused_at_parse_time(flag, value, bound, tmp_path, capsys, no_work):
    _refused(
        capsys,
        ["generate", "--prompt", "x", flag, value, "--out", str(tmp_path / "v.mp4")],
        flag,
        bound,
        workdir=tmp_path,
    )


def test_steps_past_the_bound_in_a_release_config_are_refused(tmp_path, capsys, no_work):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"inference_configs": {"parallel_configs": {"steps_per_stage": [10**20, 2, 2]}}}))
    _refused(
        capsys,
        ["generate", "--prompt", "x", "--preset", "tiny", "--config", str(path), "--out", str(tmp_path / "v.mp4")],
        str(MAX_STEPS_PER_STAGE),
        workdir=tmp_path,
    )


def test_the_library_bounds_what_it_plans():
    from tempomaster.planner import plan_stages, validate_run_config

    with pytest.raises(ValueError, match="--intervals"):
        plan_stages(9, (2**70, 1))
    with pytest.raises(ValueError, match=str(MAX_VIDEO_FRAMES)):
        plan_stages(MAX_VIDEO_FRAMES, (4, 2, 1))
    with pytest.raises(ValueError, match="--steps"):
        validate_run_config(17, 64, 96, (4, 2, 1), (2**64, 2, 2), (5.0, 3.0, 3.0))
    assert len(plan_stages(17, (4, 2, 1))) == 3


# ----------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------


def _limited(max_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))

    return apply


@pytest.mark.parametrize("flag, bound", [("--prompts", 1 << 20), ("--config", 16 << 20)])
def test_a_file_that_never_ends_is_refused(flag, bound, tmp_path):
    # in a process held to 6 GiB of address space, so an unbounded read fails there instead of here
    prompt = [] if flag == "--prompts" else ["--prompt", "x"]
    proc = subprocess.run(
        [str(BIN / "tm-run"), "generate", *prompt, flag, "/dev/zero", "--out", str(tmp_path / "v.mp4")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited(6 * GIB),
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert flag in err and "/dev/zero" in err and str(bound) in err
    assert not list(tmp_path.iterdir())


def test_a_prompts_pipe_is_read_only_up_to_the_bound(tmp_path, capsys, no_work):
    """A pipe (``--prompts <(cmd)``) fed random bytes: refused after the bound, the writer left blocked, not drained."""
    import threading

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    sent = []

    def feed():
        try:
            with open(fifo, "wb") as fh:
                for _ in range(64):  # 16 MiB at most
                    fh.write(os.urandom(1 << 18))
                    sent.append(1 << 18)
        except BrokenPipeError:  # the reader stopped at its bound
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    _refused(
        capsys,
        ["generate", "--prompts", str(fifo), "--out", str(tmp_path / "v.mp4")],
        "--prompts",
        str(fifo),
        str(1 << 20),
        workdir=tmp_path,
    )
    writer.join(10)
    assert not writer.is_alive() and sum(sent) < 4 << 20


def test_a_prompts_file_with_too_many_prompts_is_refused(tmp_path, capsys, no_work):
    rng = np.random.default_rng()
    lines = [f"prompt {rng.integers(1 << 30)}" for _ in range(10_001)]
    (tmp_path / "many.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _refused(
        capsys,
        ["generate", "--prompts", str(tmp_path / "many.txt"), "--out", str(tmp_path / "v.mp4")],
        "--prompts",
        "10001 prompts",
        "10000",
        workdir=tmp_path,
    )


def test_a_calibration_prompts_file_is_bounded(tmp_path):
    from tempomaster.calibration.prompts import read_prompt_file
    from tempomaster.errors import UsageError

    big = tmp_path / "calib.txt"
    with open(big, "w", encoding="utf-8") as fh:
        for _ in range(40_000):  # 40 000 lines of 40 bytes: past 1 MiB
            fh.write(f"a prompt {os.urandom(15).hex()}\n")
    with pytest.raises(UsageError, match="--calib-prompts.*1048576"):
        read_prompt_file(big)


# ----------------------------------------------------------------------------
# Reference images
# ----------------------------------------------------------------------------


def _png(path: Path, width: int, height: int) -> Path:
    """A real PNG of ``width`` x ``height`` of one random colour, written a row at a time (a few MB at most)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(np.random.default_rng().integers(0, 256, 3, dtype=np.uint8)) * width
    packer = zlib.compressobj(1)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [13000, 9000])  # past Pillow's own bound; under it but past ours
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(side, tmp_path, capsys, no_work, monkeypatch):
    image = _png(tmp_path / "bomb.png", side, side)
    assert image.stat().st_size < 4 << 20  # a few MB of file
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the image was decoded"))
    _refused(
        capsys,
        ["generate", "--prompt", "x", "--image", f"0:{image}", "--out", str(tmp_path / "v.mp4")],
        "--image",
        str(image),
        f"{side}x{side}",
        str(MAX_REFERENCE_PIXELS),
        workdir=tmp_path,
    )


def test_a_reference_image_far_from_the_outputs_aspect_counts_in_the_memory_estimate(
    tmp_path, capsys, no_work, eight_gib
):
    # the first image sets a 16:9-ish output; a 1 x 9000 one is cover-resized to 9000 times the output's height
    first = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng().integers(0, 256, (36, 64, 3), dtype=np.uint8)).save(first)
    thin = _png(tmp_path / "thin.png", 9000, 1)
    _refused(
        capsys,
        [
            "generate",
            "--prompt",
            "x",
            "--preset",
            "tiny",
            "--height",
            "480",
            "--width",
            "832",
            "--image",
            f"0:{first}",
            "--image",
            f"4:{thin}",
            "--out",
            str(tmp_path / "v.mp4"),
        ],
        "GiB of host memory",
        "reference images",
        "--image",
        workdir=tmp_path,
    )


def test_the_reference_images_estimate_follows_the_resize():
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.memory import estimate_peak_memory, reference_image_bytes
    from tempomaster.runtime.pipeline import GenerationRequest

    rng = np.random.default_rng()
    square = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    thin = Image.fromarray(rng.integers(0, 256, (1, 600, 3), dtype=np.uint8))
    base = dict(prompt="x", height=64, width=64, num_frames=17)
    assert reference_image_bytes(GenerationRequest(**base)) == 0
    one = reference_image_bytes(GenerationRequest(ref_images={0: square}, **base))
    # 48x48 float32 and two temporaries, its resize to 64x64, and the prepared 64x64 frame
    assert one == 3 * 48 * 48 * 12 + 64 * 64 * 12 + 64 * 64 * 12
    both = GenerationRequest(ref_images={0: square, 4: thin}, **base)
    # the thin one is resized to 64 x 38400 before its crop
    assert reference_image_bytes(both) >= 64 * 38400 * 12
    estimate = estimate_peak_memory(get_preset("tiny"), both, dtype="fp32", device="cpu")
    assert estimate.parts["reference images"] == reference_image_bytes(both)
    without = estimate_peak_memory(get_preset("tiny"), GenerationRequest(**base), dtype="fp32", device="cpu")
    assert estimate.host_bytes - without.host_bytes >= reference_image_bytes(both) - 2**24  # RSS may move a little


def test_one_image_for_many_prompts_is_decoded_once(tmp_path):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import GenerateOptions, build_jobs

    image = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng().integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    (tmp_path / "p.txt").write_text("a\nb\nc\n", encoding="utf-8")
    jobs = build_jobs(GenerateOptions(prompts=tmp_path / "p.txt", images=[f"0:{image}"]), get_preset("tiny").defaults)
    assert len(jobs) == 3 and len({id(j.request.ref_images[0]) for j in jobs}) == 1


# ----------------------------------------------------------------------------
# --config files that are not a JSON object of the right shape
# ----------------------------------------------------------------------------


def _models(**overrides):
    models = {
        "wan_video_text_encoder_path": "enc.pth",
        "wan_video_vae_path": "vae.pth",
        "wan_video_dit_path": "dit.bin",
    }
    return {"model_configs": {**models, **overrides}}


def _file(content):
    """A maker of ``cfg.json`` holding ``content`` (bytes, or a JSON value)."""

    def make(folder: Path) -> Path:
        path = folder / "cfg.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return path

    return make


def _folder(folder: Path) -> Path:
    (folder / "cfg").mkdir()
    return folder / "cfg"


@pytest.mark.parametrize(
    "make, needle",
    [
        (_folder, "is a folder"),
        (_file(os.urandom(64) + b"\xff\xfe"), "not UTF-8"),
        (_file([1, 2]), "JSON object"),
        (_file(7), "JSON object"),
        (_file(_models(wan_video_dit_path=5)), "model_configs.wan_video_dit_path"),
        (_file(_models(wan_video_vae_path=["a"])), "model_configs.wan_video_vae_path"),
        (_file(_models(wan_video_text_encoder_path=None)), "model_configs.wan_video_text_encoder_path"),
        (_file(_models(wan_video_dit_config=[1])), "model_configs.wan_video_dit_config"),
    ],
)
def test_a_config_that_is_not_a_release_config_is_one_line(make, needle, tmp_path, capsys, no_work):
    work = tmp_path / "work"
    work.mkdir()
    path = make(work)
    _refused(
        capsys,
        ["generate", "--prompt", "x", "--config", str(path), "--out", str(tmp_path / "v.mp4")],
        "--config",
        str(path),
        needle,
        workdir=tmp_path,
    )
