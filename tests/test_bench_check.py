"""The baseline check of benchmarks/suite.py on hand-made results (no timing: deterministic)."""

import copy

import pytest

from benchmarks import suite


def results(gpu=None, **figures) -> dict:
    return {
        "config": {
            "preset": "tiny",
            "shape": {"height": 32},
            "steps_per_stage": [6, 4, 4],
            "precision": "fp32",
            "threads": 1,
        },
        "machine": {"gpu": {"name": gpu} if gpu else None},
        "figures": figures,
    }


BASE = dict(
    **{
        "dit_b8: onnxruntime / torch time": 0.6,
        "generate: torch overhead share": 0.02,
        "generate: torch time / sum of parts": 1.0,
    }
)


def test_within_tolerance_passes_and_improvements_pass():
    run = results(
        **{
            "dit_b8: onnxruntime / torch time": 0.6 * 1.149,
            "generate: torch overhead share": 0.001,
            "generate: torch time / sum of parts": 0.5,
        }
    )
    assert suite.check(run, results(**BASE)) == []


def test_every_regressed_figure_is_named():
    run = results(
        **{
            "dit_b8: onnxruntime / torch time": 0.6 * 1.16,
            "generate: torch overhead share": 0.031,
            "generate: torch time / sum of parts": 1.2,
        }
    )
    problems = suite.check(run, results(**BASE))
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == [
        "dit_b8: onnxruntime / torch time",
        "generate: torch overhead share",
        "generate: torch time / sum of parts",
    ]
    assert "+16%" in problems[0]
    # a wider tolerance lets the ratio through; the share still has its one-point floor only
    assert len(suite.check(run, results(**BASE), tolerance=0.25)) == 1


def test_share_floor():
    run = results(**dict(BASE, **{"generate: torch overhead share": 0.0299}))
    assert suite.check(run, results(**BASE)) == []


def test_absolute_latencies_only_against_the_same_gpu():
    run = results(gpu="NVIDIA H100", **{"dit_b8: tensorrt ms": 130.0})
    assert suite.check(run, results(gpu="NVIDIA H100", **{"dit_b8: tensorrt ms": 100.0})) != []
    assert suite.check(run, results(gpu="NVIDIA H200", **{"dit_b8: tensorrt ms": 100.0})) == []
    assert suite.check(run, results(**{"dit_b8: tensorrt ms": 100.0})) == []


def test_other_settings_are_refused():
    base = results(**BASE)
    run = copy.deepcopy(base)
    run["config"]["steps_per_stage"] = [2, 2, 2]
    with pytest.raises(suite.CheckError, match="steps_per_stage"):
        suite.check(run, base)


def test_machine_kind_names_the_hardware():
    assert suite.machine_kind({"gpu": {"name": "NVIDIA H100 80GB HBM3"}}) == "gpu-nvidia-h100-80gb-hbm3"
    assert (
        suite.machine_kind({"gpu": None, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_affinity": 2, "cpu_count": 8})
        == "cpu-intel-r-xeon-r-processor-2cpu"
    )


def test_unsteady_figures_are_named_not_checked():
    runs = [
        {"a: x / torch time": 1.0, "b: torch overhead share": 0.010, "c: y / torch time": 1.0},
        {"a: x / torch time": 1.1, "b: torch overhead share": 0.019, "c: y / torch time": 1.5},
    ]
    unsteady = suite.unsteady_figures(runs, 0.15)
    assert unsteady == {"c: y / torch time": 0.5}  # a: 10% spread; b: under the shares' one-point slack
    base = results(**{"a: x / torch time": 1.0, "c: y / torch time": 1.0})
    base["unsteady"] = unsteady
    run = results(**{"a: x / torch time": 1.0, "c: y / torch time": 3.0})
    assert suite.check(run, base) == []
    run["figures"]["a: x / torch time"] = 1.2
    assert [p.split(":")[0] for p in suite.check(run, base)] == ["a"]
