"""The profiler view: named ranges in the Chrome trace, the per-stage breakdown and its chart."""

import json
import time
from collections import Counter

import pytest
from PIL import Image

from tempomaster.errors import UsageError
from tempomaster.runtime.backends.torch import TorchBackend
from tempomaster.runtime.pipeline import GenerationRequest, generate
from tempomaster.runtime.profiling import CATEGORIES, plot_breakdown, profile_generation


@pytest.fixture(scope="module")
def profiled(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    backend = TorchBackend(tiny_models)
    request = GenerationRequest(
        prompt="a red ball", height=16, width=16, num_frames=9, steps_per_stage=(3, 2, 2), seed=4
    )
    with profile_generation(out, title="tiny") as prof:
        result = generate(prof.wrap(backend), tiny_models.tokenizer, request, progress=False)
        with prof.phase("writing"):
            time.sleep(0.05)
    return out, result


def test_trace_has_the_named_ranges(profiled):
    out, result = profiled
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    names = Counter(e["name"] for e in events if e.get("ph") == "X")
    assert names["backend.velocity"] == result.dit_calls == 7
    assert names["backend.encode_text"] == 1
    assert names["backend.vae_encode"] == 3  # one call per stage, all its chunks
    assert names["backend.vae_decode"] == 1 + 2 + 4  # one chunk per call
    assert [names[f"stage {k}"] for k in range(3)] == [1, 1, 1] and names["stage 3"] == 0
    # a step per DiT call: steps 0 and 1 in every stage, step 2 in stage 0 only
    assert (names["step 0"], names["step 1"], names["step 2"]) == (3, 3, 1)
    assert names["writing"] == 1
    # ranges nest: every DiT call lies inside a step, every step inside a stage
    spans = {n: [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["name"] == n] for n in names}
    steps = [s for k in range(3) for s in spans[f"step {k}"]]
    stages = [s for k in range(3) for s in spans[f"stage {k}"]]
    inside = lambda a, outer: any(o[0] <= a[0] and a[1] <= o[1] for o in outer)  # noqa: E731
    assert all(inside(v, steps) for v in spans["backend.velocity"])
    assert all(inside(s, stages) for s in steps)


def test_breakdown_accounts_for_the_generation(profiled):
    out, result = profiled
    data = json.loads((out / "breakdown.json").read_text())["seconds"]
    assert list(data) == ["text", "stage 0", "stage 1", "stage 2", "writing"]
    for row, cats in data.items():
        assert set(cats) <= set(CATEGORIES) and all(v >= 0 for v in cats.values()), row
    for k in range(3):
        assert {"vae_encode", "dit", "guidance", "vae_decode"} <= set(data[f"stage {k}"])
    assert data["writing"]["writing"] >= 0.05
    backend_total = sum(c.get(k, 0) for c in data.values() for k in ("text", "vae_encode", "dit", "vae_decode"))
    # the wrapper's clock and the pipeline's see the same calls (the pipeline's includes a .float() per call)
    assert backend_total == pytest.approx(result.backend_seconds, rel=0.1)
    generation = sum(sum(c.values()) for row, c in data.items() if row != "writing")
    assert generation <= result.seconds * 1.01


def test_chart_is_drawn(profiled):
    out, _ = profiled
    with Image.open(out / "stages.png") as img:
        assert img.format == "PNG" and img.width == 820 and img.height > 200
        # the DiT's colour is on the chart
        assert (230, 120, 50) in {c for _, c in img.convert("RGB").getcolors(1 << 16)}


def test_plot_breakdown_rejects_nothing(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_breakdown({}, tmp_path / "x.png")


def test_profile_dir_must_be_a_directory(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="--profile"):
        with profile_generation(target):
            pass


def test_tm_run_generate_profile_writes_trace_breakdown_and_chart(tmp_path, capsys):
    from tempomaster.cli import run_main

    rc = run_main(
        [
            "generate",
            "--prompt",
            "a boat",
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "5",
            "--steps",
            "1,1,1",
            "--no-progress",
            "--out",
            str(tmp_path / "v.mp4"),
            "--profile",
            str(tmp_path / "prof"),
        ]
    )
    assert rc == 0
    assert {p.name for p in (tmp_path / "prof").iterdir()} >= {"trace.json", "breakdown.json", "stages.png"}
    (tmp_path / "blocker").write_text("x")
    rc = run_main(
        ["generate", "--prompt", "a boat", "--out", str(tmp_path / "w.mp4"), "--profile", str(tmp_path / "blocker")]
    )
    assert rc == 2 and "--profile" in capsys.readouterr().err
    assert not (tmp_path / "w.mp4").exists()
