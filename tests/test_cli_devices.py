"""`tm-run plan` and `tm-run generate --devices` as a user runs them."""

from __future__ import annotations

import json

import numpy as np

from tempomaster.cli import run_main
from tempomaster.runtime.video import read_video_frames


def test_plan_for_the_release_defaults(capsys):
    # 109 frames, [4,2,1], steps [50,32,32], guidance on: 2, 4, 8 sequences per step; 40 heads
    expected = {1: 484, 2: 242, 4: 121, 8: 60.5}
    for devices, forwards in expected.items():
        assert run_main(["plan", "--preset", "tempomaster-14b", "--devices", str(devices), "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["sequential_forwards"] == forwards
        assert [s["sequences_per_step"] for s in plan["stages"]] == [2, 4, 8]
    assert run_main(["plan", "--preset", "tempomaster-14b", "--devices", "8", "--no-sequence-parallel", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequential_forwards"] == 114  # 50 + 32 + 32: one sequence per rank
    assert run_main(["plan", "--preset", "tempomaster-14b", "--devices", "8", "--forward-seconds", "5"]) == 0
    assert "302.5 s" in capsys.readouterr().out  # 60.5 forwards x 5 s


def test_generate_on_two_cpu_processes_equals_one(tmp_path, capsys):
    common = [
        "generate",
        "--prompt",
        "a red ball",
        "--height",
        "32",
        "--width",
        "48",
        "--num-frames",
        "9",
        "--steps",
        "2,1,1",
        "--seed",
        "3",
        "--no-progress",
        "--threads",
        "1",
    ]
    # lossless PNG frames: H.264 would turn a one-level difference into several
    assert run_main([*common, "--out", str(tmp_path / "one")]) == 0
    assert run_main([*common, "--devices", "cpu:2", "--timeout", "120", "--out", str(tmp_path / "two")]) == 0
    out = capsys.readouterr().out
    assert out.count(str(tmp_path / "two")) == 1  # printed once, by the launcher
    one, _ = read_video_frames(tmp_path / "one" / "video")
    two, _ = read_video_frames(tmp_path / "two" / "video")
    assert one.shape == two.shape == (36, 32, 48, 3)
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1  # within 1/255
