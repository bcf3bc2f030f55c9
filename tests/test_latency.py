"""Latency regression check (`python -m pytest -m latency`): this tree against the reference revision, same run.

Not in the default run: it takes a few minutes. Nothing recorded on another
machine is compared, so it runs (never skips) on any machine with git: the
reference revision (benchmarks/baselines/reference.json) is checked out into a
temporary worktree and both trees time whole generations of the tiny preset in
alternating processes (benchmarks/compare.py). The tolerance is the one
reference.json records from the measured noise of a tree against itself.
"""

import json

import pytest

from benchmarks import compare

pytestmark = pytest.mark.latency


def test_no_slower_than_the_reference_revision(tmp_path, capsys):
    out = tmp_path / "compare.json"
    rc = compare.main(["--compare", "--out", str(out)])
    printed = capsys.readouterr()
    print(printed.out)
    assert rc != 2, printed.err
    data = json.loads(out.read_text())
    assert rc == 0, f"slower than {data['reference']}: ratio {data['ratio']:.3f} past {data['tolerance']:.0%}"


def test_a_tree_made_slower_is_caught():
    """The working tree with 0.6 s added to every generation (about +40% on the tiny workload) must fail."""
    tolerance = compare.read_reference()["tolerance"]
    with compare.revision_tree("HEAD") as (tree, _):
        pipeline = tree / "tempomaster" / "runtime" / "pipeline.py"
        pipeline.write_text(
            pipeline.read_text()
            + (
                "\n\n_timed_generate = generate\n\n\ndef generate(*args, **kwargs):\n"
                "    import time\n    time.sleep(0.6)\n    return _timed_generate(*args, **kwargs)\n"
            )
        )
        times = compare.compare_trees(tree, compare.REPO, runs=3, generations=2, threads=1)
    ratio = compare.ratio_of_medians(times["current"], times["reference"])
    assert not compare.verdict(ratio, tolerance), f"a 0.6 s slowdown passed: ratio {ratio:.3f}"
