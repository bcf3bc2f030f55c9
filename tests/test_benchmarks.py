"""Smoke tests of benchmarks/bench_backends.py at a tiny shape (one timed run per op)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backends.py"
OPS = ("dit", "vae_decode", "vae_encode", "text", "generate")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_backends", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_results(path: Path, shape: dict) -> dict:
    data = json.loads(path.read_text())
    assert set(OPS) <= set(data["ops"])
    for op in OPS:
        entry = data["ops"][op]
        for backend in ("torch", "onnxruntime"):
            assert entry[backend]["median_ms"] > 0, (op, backend)
            assert all(t > 0 for t in entry[backend]["runs_ms"])
        assert entry["ratio_torch_over_ort"] > 0
        assert entry["rel_error"] < data["tolerance"], op
    assert 0 <= data["ops"]["generate"]["torch"]["outside_share"] < 1
    assert 0 <= data["ops"]["generate"]["onnxruntime"]["outside_share"] < 1
    for key, value in shape.items():
        assert data["shape"][key] == value
    m = data["machine"]
    assert m["cpu_count"] >= 1 and m["torch"] and m["onnxruntime"] and m["torch_threads"] >= 1
    assert data["agree"]
    return data


def test_bench_reuses_a_build(tiny_build, tmp_path, capsys):
    """--build: the session's tiny export (32x48, 9 frames, intervals 4,2,1) is timed as it is."""
    import torch

    bench = _load_script()
    out = tmp_path / "results.json"
    threads = torch.get_num_threads()
    rc = bench.main(
        [
            "--build",
            str(tiny_build),
            "--steps",
            "1,1,1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--generate-repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert torch.get_num_threads() == threads  # --threads holds for the run only
    data = _check_results(out, {"height": 32, "width": 48, "num_frames": 9, "intervals": [4, 2, 1]})
    assert data["build"]["export_seconds"] is None
    assert data["settings"]["threads"] == 1
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["ort_intra_op_threads"] == 1
    assert data["ops"]["generate"]["torch"]["dit_calls"] == 3
    # the largest stage (4 chunks) with its unconditional twins: a DiT batch of 8
    assert data["ops"]["dit"]["inputs"]["x"][0] == 8
    printed = capsys.readouterr().out
    for op in OPS:
        assert op in printed
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary name was renamed away


@pytest.mark.slow
def test_bench_exports_its_own_build(tmp_path):
    """Without --build the script exports the preset first (a minute or more on a CPU)."""
    bench = _load_script()
    out = tmp_path / "results.json"
    rc = bench.main(
        [
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "5",
            "--intervals",
            "2,1",
            "--steps",
            "1,1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--generate-repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = _check_results(out, {"height": 32, "width": 48, "num_frames": 5, "intervals": [2, 1]})
    assert data["build"]["export_seconds"] > 0


def test_suite_smoke(tiny_build, tmp_path, capsys):
    """python -m benchmarks at one sample per op: every op of the stage plan, the fingerprint, the figures,
    the charts, and a results file checked against itself."""
    import subprocess
    import sys

    from benchmarks import suite

    out = tmp_path / "suite.json"
    rc = suite.main(
        [
            "--build",
            str(tiny_build),
            "--steps",
            "1,1,1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--generate-repeats",
            "1",
            "--sample-ms",
            "1",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "g.png"),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    # the stage plan of 9 frames at [4, 2, 1] has 1, 2 and 4 chunks: DiT batches 2, 4 and 8
    assert [op for op in data["ops"] if op.startswith("dit_b")] == ["dit_b2", "dit_b4", "dit_b8"]
    assert data["ops"]["dit_b8"]["inputs"]["x"][0] == 8
    assert data["backends"][0] == "torch" and "tensorrt" in data["skipped_backends"]
    m = data["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["libraries"]["torch"] and "gpu" in m
    assert data["machine_kind"] == suite.machine_kind(m)
    for name in data["backends"]:
        g = data["generate"][name]
        assert g["dit_calls"] == 3 and 0 <= g["outside_share"] < 1 and g["over_parts"] > 0
        assert list(g["breakdown"]) == ["text", "stage 0", "stage 1", "stage 2"]
        assert (tmp_path / f"g-{name}.png").stat().st_size > 0
    assert all(v > 0 for v in data["figures"].values())
    capsys.readouterr()
    assert suite.main(["--results", str(out), "--check", str(out)]) == 0
    assert "figures within 15%" in capsys.readouterr().out
    help_text = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert "--check BASELINE" in help_text and "--record-baseline" in help_text


def test_op_inputs_take_the_presets_text_length():
    """The toy's text is 32 tokens: the timed DiT call gets a context of that length, as the pipeline's."""
    import torch

    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.sources import load_model_set
    from tempomaster.runtime.backends.torch import TorchBackend

    bb = _load_script()
    models = load_model_set("toy", None, None)
    backend = TorchBackend(models)
    d = models.preset.defaults
    inputs = bb.make_inputs(
        backend.info,
        models.tokenizer,
        ExportShape.from_preset(models.preset),
        d.steps_per_stage,
        d.shift_per_stage,
        seed=0,
    )
    assert inputs["text"]["ids"].shape[1] == inputs["dit"]["context"].shape[1] == models.preset.t5.text_len == 32
    velocity = backend.velocity(**inputs["dit"])
    assert velocity.shape == inputs["dit"]["x"].shape and torch.isfinite(velocity).all()
