"""tm-run upsample: a user's low-rate video becomes a stage's output and the later stages lift it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tempomaster.errors import UsageError
from tempomaster.runtime.request import GenerateOptions
from tempomaster.runtime.upsample import (
    UpsampleOptions,
    map_rate,
    output_stage,
    resample_indices,
    run_upsample,
    usable_frames,
)
from tempomaster.runtime.video import read_video_frames, to_uint8_frames, write_mp4
from tempomaster.toy.clips import render_clip, sample_clip_spec

HELD_OUT_SEED = 2**31 + 7  # the trainer draws clip seeds below 2**31


def test_rates_map_to_stages():
    assert (map_rate(6.0, 24, (4, 2, 1)).stage, map_rate(6.0, 24, (4, 2, 1)).resampled) == (0, False)
    assert map_rate(12.0, 24, (4, 2, 1)).stage == 1
    assert map_rate(5.994, 24, (4, 2, 1)).resampled is False  # NTSC-style 1000/1001 rates: within 0.2%
    eight = map_rate(8.0, 24, (4, 2, 1))
    assert eight.stage == 0 and eight.resampled and "8 fps resampled to 6 fps" in eight.note
    assert map_rate(10.0, 24, (4, 2, 1)).stage == 1  # |log(10/12)| < |log(10/6)|
    for fps, why in (
        (24.0, "nothing to lift"),
        (30.0, "nothing to lift"),
        (2.0, "below half"),
        (0.0, "no usable frame rate"),
        (float("nan"), "no usable frame rate"),
    ):
        with pytest.raises(UsageError, match=why):
            map_rate(fps, 24, (4, 2, 1))


def test_resampling_and_the_4k_plus_1_rule():
    # 8 fps -> 6 fps: output frame k at k/6 s takes input round(k * 8 / 6), within 23 frames (2.75 s)
    assert resample_indices(23, 8.0, 6.0) == [0, 1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 19, 20, 21]
    assert resample_indices(5, 6.0, 6.0) == [0, 1, 2, 3, 4]
    assert [usable_frames(n) for n in (0, 1, 4, 5, 8, 9, 34)] == [0, 1, 1, 5, 5, 9, 33]
    assert output_stage(None, [6, 12, 24], 0) == 2 and output_stage(12, [6, 12, 24], 0) == 1
    with pytest.raises(UsageError, match="lifts to 24 fps"):
        output_stage(12, [6, 12, 24], 1)


def _clip_at(fps_step: int, frames: int = 68) -> np.ndarray:
    spec = sample_clip_spec(HELD_OUT_SEED, motion="sliding right", colour="red", background="plain")
    return to_uint8_frames(render_clip(spec, frames))[::fps_step], spec.caption


def _upsample(video: Path, out: Path, prompt: str, to_fps=None, **kw):
    gen = GenerateOptions(
        prompt=prompt, preset="toy", steps=(1, 1, 1), seed=0, out=out, progress=False, threads=1, **kw
    )
    return run_upsample(UpsampleOptions(video=video, to_fps=to_fps, generate=gen), echo=lambda _: None)


def test_upsample_6fps_clip_end_to_end_on_the_toy(tmp_path):
    frames, caption = _clip_at(4)  # 17 frames at 6 fps: 4k + 1, nothing dropped
    assert len(frames) == 17
    video = write_mp4(frames, tmp_path / "in.mp4", 6.0)
    report = _upsample(video, tmp_path / "out.mp4", caption)
    lifted, fps = read_video_frames(tmp_path / "out.mp4")
    assert lifted.shape == (4 * 17, 64, 96, 3) and fps == pytest.approx(24.0)
    assert "lifted 17 input frames at 6 fps" in report.lines[0]


@pytest.mark.slow
def test_upsample_to_12fps_stops_after_the_12fps_stage(tmp_path):
    frames, caption = _clip_at(4)
    video = write_mp4(frames, tmp_path / "in.mp4", 6.0)
    _upsample(video, tmp_path / "out12.mp4", caption, to_fps=12.0)
    half, fps = read_video_frames(tmp_path / "out12.mp4")
    assert half.shape == (2 * 17, 64, 96, 3) and fps == pytest.approx(12.0)


def test_upsample_drops_frames_past_4k_plus_1(tmp_path):
    frames, caption = _clip_at(2, 40)  # 20 frames at 12 fps -> 17 kept -> 34 at 24 fps
    video = write_mp4(frames, tmp_path / "in12.mp4", 12.0)
    lines = []
    gen = GenerateOptions(
        prompt=caption, preset="toy", steps=(1, 1, 1), out=tmp_path / "o.mp4", progress=False, threads=1
    )
    run_upsample(UpsampleOptions(video=video, to_fps=None, generate=gen), echo=lines.append)
    assert any("the last 3 of 20 dropped" in line for line in lines)
    lifted, _ = read_video_frames(tmp_path / "o.mp4")
    assert len(lifted) == 2 * 17


@pytest.fixture
def no_models(monkeypatch):
    """Every refusal below must come before a model is loaded."""
    import tempomaster.runtime.backends.factory as factory

    def refuse(*_args, **_kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(factory, "backend_factory", refuse)


def test_bad_videos_are_refused_before_any_model_loads(tmp_path, no_models):
    import imageio_ffmpeg

    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    with pytest.raises(UsageError, match="is not a video ffmpeg can read"):
        _upsample(text, tmp_path / "o.mp4", "x")
    empty = tmp_path / "empty.mp4"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=c=red:s=32x32:r=6",
            "-frames:v",
            "0",
            str(empty),
        ],
        check=True,
    )
    with pytest.raises(UsageError, match="no frames"):
        _upsample(empty, tmp_path / "o.mp4", "x")
    frames, _ = _clip_at(1, 9)
    fast = write_mp4(frames, tmp_path / "fast.mp4", 24.0)
    with pytest.raises(UsageError, match="24 fps is nearest the output's own 24 fps"):
        _upsample(fast, tmp_path / "o.mp4", "x")
    short = write_mp4(frames[:3], tmp_path / "short.mp4", 6.0)
    with pytest.raises(UsageError, match="at least 5 are needed"):
        _upsample(short, tmp_path / "o.mp4", "x")
    assert not (tmp_path / "o.mp4").exists()


def test_too_many_frames_for_memory_is_refused(tmp_path, monkeypatch, no_models):
    import tempomaster.runtime.memory as memory

    frames, _ = _clip_at(4)
    video = write_mp4(frames, tmp_path / "in.mp4", 6.0)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1 << 20)  # 1 MiB: 68 frames need 5 MiB
    with pytest.raises(UsageError, match=r"--video .*in.mp4 \(17 frames at 6 fps\)"):
        _upsample(video, tmp_path / "o.mp4", "x")
