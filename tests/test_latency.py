"""Latency regression check against this machine kind's baseline (`python -m pytest -m latency`).

Not in the default run: it times the tiny preset for a few minutes. The
baseline is benchmarks/baselines/<machine-kind>.json, recorded with
`python -m benchmarks --build DIR --runs 3 --record-baseline` (DIR: an fp32 tiny
build at 32x48, 9 frames, intervals 4,2,1, the shape of the session's
`tiny_build`). The check repeats the baseline's settings, --runs included: each
figure is a median over whole runs, so one run under a burst of load from
other jobs does not decide it.
"""
import json
from pathlib import Path

import pytest

from benchmarks import suite

pytestmark = pytest.mark.latency


def _baseline_path() -> Path:
    return suite.BASELINES_DIR / f"{suite.machine_kind(suite.fingerprint())}.json"


@pytest.fixture(scope="module")
def measured(tiny_build, tmp_path_factory):
    path = _baseline_path()
    if not path.exists():
        pytest.skip(f"no baseline for this machine kind ({path.name}): record one with "
                    "python -m benchmarks --build DIR --record-baseline")
    baseline = json.loads(path.read_text())
    shape, s = baseline["config"]["shape"], baseline["settings"]
    assert (shape["height"], shape["width"], shape["num_frames"], shape["intervals"]) == (32, 48, 9, [4, 2, 1])
    out = tmp_path_factory.mktemp("latency") / "results.json"
    argv = ["--build", str(tiny_build), "--steps", ",".join(map(str, baseline["config"]["steps_per_stage"])),
            "--threads", str(baseline["config"]["threads"]), "--repeats", str(s["repeats"]), "--warmup", str(s["warmup"]),
            "--generate-repeats", str(s["generate_repeats"]), "--sample-ms", str(s["sample_ms"]), "--seed", str(s["seed"]),
            "--runs", str(s.get("runs", 1)), "--out", str(out), "--check", str(path)]
    rc = suite.main(argv)
    return rc, out, path


def test_latency_within_tolerance_of_the_baseline(measured, capsys):
    rc, out, path = measured
    data = json.loads(out.read_text())
    print(json.dumps(data["figures"], indent=1))
    assert rc == 0, f"regressed against {path}: see the REGRESSED lines above"


def test_check_fails_against_a_baseline_30_percent_faster(measured, tmp_path, capsys):
    """The same measurements against a copy of the baseline edited to be 30% faster: every figure is named."""
    _, out, path = measured
    baseline = json.loads(path.read_text())
    baseline["figures"] = {k: v * 0.7 for k, v in baseline["figures"].items()}
    edited = tmp_path / "faster.json"
    edited.write_text(json.dumps(baseline))
    capsys.readouterr()
    rc = suite.main(["--results", str(out), "--check", str(edited)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "REGRESSED" in printed
    data = json.loads(out.read_text())
    for name, value in data["figures"].items():
        base = baseline["figures"][name]
        if name in baseline.get("unsteady", {}):
            assert f"not checked: {name}" in printed
            continue
        if name.endswith("share") and value <= base + suite.SHARE_FLOOR:
            continue  # shares of a few percent get one point of slack (see suite.check)
        assert f"{name}:" in printed, name
