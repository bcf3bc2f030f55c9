"""The same-run comparison of benchmarks/compare.py: its arithmetic and its worktree (no timing)."""

import subprocess

import pytest

from benchmarks import compare


def test_ratio_is_current_median_over_reference_median():
    # medians 2.0 and 1.6 (the outliers 9.0 and 0.1 do not move them): 2.0 / 1.6 = 1.25
    assert compare.ratio_of_medians([2.0, 9.0, 1.9, 2.1, 2.0], [1.6, 0.1, 1.7, 1.5, 1.6]) == pytest.approx(1.25)


@pytest.mark.parametrize(
    "ratio, tolerance, ok",
    [
        (1.0, 0.1, True),
        (1.1, 0.1, True),
        (1.1001, 0.1, False),
        (0.5, 0.0, True),
        (1.2, 0.25, True),
        (1.3, 0.25, False),
    ],
)
def test_verdict_fails_only_past_the_tolerance(ratio, tolerance, ok):
    assert compare.verdict(ratio, tolerance) is ok


def test_the_shipped_reference_names_a_commit_and_a_tolerance_from_measured_noise():
    ref = compare.read_reference()
    assert len(ref["commit"]) >= 7 and int(ref["commit"], 16) >= 0
    noise = ref["noise"]
    assert len(noise["ratios"]) >= 5
    # the tolerance covers the worst ratio of a tree against itself
    assert ref["tolerance"] >= max(abs(r - 1) for r in noise["ratios"])


def test_a_bad_reference_file_is_one_clear_error(tmp_path):
    path = tmp_path / "reference.json"
    path.write_text('{"commit": 5}')
    with pytest.raises(compare.CompareError, match="reference.json: needs a 'commit'"):
        compare.read_reference(path)


def _in_git_checkout() -> bool:
    done = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=compare.REPO, capture_output=True, text=True
    )
    return done.returncode == 0 and done.stdout.strip() == "true"


@pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout: no revision to check out")
def test_revision_tree_checks_out_the_revision_and_leaves_nothing():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=compare.REPO, capture_output=True, text=True).stdout.strip()
    with compare.revision_tree("HEAD") as (tree, commit):
        assert commit == head
        assert (tree / "tempomaster" / "runtime" / "pipeline.py").is_file()
        listed = subprocess.run(["git", "worktree", "list"], cwd=compare.REPO, capture_output=True, text=True).stdout
        assert str(tree) in listed
    assert not tree.exists()
    listed = subprocess.run(["git", "worktree", "list"], cwd=compare.REPO, capture_output=True, text=True).stdout
    assert str(tree) not in listed


@pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout: no revision to check out")
def test_an_unknown_revision_is_refused():
    with pytest.raises(compare.CompareError, match="rev-parse"):
        with compare.revision_tree("no-such-revision-0123"):
            pass
