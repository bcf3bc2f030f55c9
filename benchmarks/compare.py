"""`python -m benchmarks --compare [REV]`: this tree against a reference revision, side by side, in one run.

    python -m benchmarks --compare            # against the commit in benchmarks/baselines/reference.json
    python -m benchmarks --compare REV [--runs 5] [--generations 3] [--threads 1] [--tolerance T] [--out FILE]

Absolute times do not carry between machines, and these machines are noisy,
so nothing recorded elsewhere is compared: REV is checked out into a temporary
git worktree and both trees time the same workload (whole generations of the
tiny preset, benchmarks/compare_driver.py) in alternating processes on this
machine, the order swapped every run, so load from other jobs falls on both.
The verdict is the ratio of the medians of every timed generation, current
over reference; it fails past 1 + tolerance. The tolerance comes from the
measured run-to-run noise of a tree against itself (reference.json says how
it was measured). Exit 0: within tolerance; 1: slower; 2: cannot compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("compare_driver.py")
REFERENCE_FILE = Path(__file__).resolve().parent / "baselines" / "reference.json"


class CompareError(Exception):
    """The comparison cannot run (no git, an unknown revision, a side that fails)."""


def read_reference(path: Path = REFERENCE_FILE) -> dict:
    """{"commit": ..., "tolerance": ..., "noise": {...}}: the revision the latency check compares against."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CompareError(f"{path}: cannot read the reference revision ({err})") from None
    if not isinstance(data.get("commit"), str) or not isinstance(data.get("tolerance"), (int, float)):
        raise CompareError(f"{path}: needs a 'commit' (string) and a 'tolerance' (number)")
    return data


def _git(*args: str, cwd: Path = REPO) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise CompareError("git is not installed: the reference revision cannot be checked out") from None
    if done.returncode != 0:
        raise CompareError(
            f"git {' '.join(args)}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}"
        )
    return done.stdout.strip()


@contextmanager
def revision_tree(rev: str):
    """REV checked out (detached) into a temporary worktree, removed afterwards whatever happens."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    parent = Path(tempfile.mkdtemp(prefix="tm-compare-"))
    tree = parent / "reference"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(tree), commit)
        yield tree, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True, check=False)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True, check=False)


def time_tree(tree: Path, generations: int, threads: int) -> list[float]:
    """Seconds of each timed generation, measured by the driver in a fresh process importing `tree`'s package."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(DRIVER), "--generations", str(generations), "--threads", str(threads)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompareError(f"{tree}: the timing driver failed (exit {done.returncode}): {tail}")
    data = json.loads(lines[-1])
    if not Path(data["package"]).resolve().is_relative_to(tree.resolve()):
        raise CompareError(f"{tree}: the driver imported tempomaster from {data['package']}, not from this tree")
    return [float(s) for s in data["generate"]]


def ratio_of_medians(current: list[float], reference: list[float]) -> float:
    """Current over reference: above 1 is slower."""
    return statistics.median(current) / statistics.median(reference)


def verdict(ratio: float, tolerance: float) -> bool:
    """True when the current tree is no slower than the reference by more than `tolerance`."""
    return ratio <= 1.0 + tolerance


def compare_trees(current: Path, reference: Path, runs: int, generations: int, threads: int, say=print) -> dict:
    """Both trees timed in alternating processes, the first swapped every run."""
    times = {"current": [], "reference": []}
    trees = {"current": current, "reference": reference}
    for k in range(runs):
        order = ("current", "reference") if k % 2 == 0 else ("reference", "current")
        for side in order:
            seconds = time_tree(trees[side], generations, threads)
            times[side] += seconds
            say(f"run {k + 1}/{runs} {side:9s} " + " ".join(f"{s:.3f}" for s in seconds))
    return times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks --compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--compare",
        nargs="?",
        const="",
        default="",
        metavar="REV",
        help="the reference revision (default: the commit in benchmarks/baselines/reference.json)",
    )
    p.add_argument("--runs", type=int, default=5, help="alternating rounds (each: one process per tree)")
    p.add_argument("--generations", type=int, default=3, help="timed generations per process, after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    p.add_argument("--tolerance", type=float, default=None, help="default: reference.json's, from the measured noise")
    p.add_argument("--out", type=Path, default=None, help="write the times and the verdict as JSON")
    args = p.parse_args(argv)
    if args.runs < 1 or args.generations < 1 or args.threads < 1:
        p.error("--runs, --generations and --threads must be >= 1")
    if args.tolerance is not None and args.tolerance < 0:
        p.error("--tolerance must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rev, tolerance = args.compare, args.tolerance
        if not rev or tolerance is None:
            reference = read_reference()
            rev = rev or reference["commit"]
            tolerance = reference["tolerance"] if tolerance is None else tolerance
        with revision_tree(rev) as (tree, commit):
            print(
                f"comparing {REPO} (working tree) with {commit[:12]} ({rev}), {args.runs} alternating runs "
                f"x {args.generations} generations, {args.threads} thread(s)",
                flush=True,
            )
            times = compare_trees(
                REPO, tree, args.runs, args.generations, args.threads, say=lambda line: print(line, flush=True)
            )
    except CompareError as err:
        print(f"python -m benchmarks --compare: error: {err}", file=sys.stderr)
        return 2
    ratio = ratio_of_medians(times["current"], times["reference"])
    ok = verdict(ratio, tolerance)
    result = {
        "reference": rev,
        "commit": commit,
        "runs": args.runs,
        "generations": args.generations,
        "threads": args.threads,
        "tolerance": tolerance,
        "seconds": times,
        "median": {side: statistics.median(v) for side, v in times.items()},
        "ratio": ratio,
        "ok": ok,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, args.out)
    print(
        f"generation median: current {result['median']['current']:.3f} s, reference {result['median']['reference']:.3f} s, "
        f"ratio {ratio:.3f} (tolerance {tolerance:.0%}): {'ok' if ok else 'REGRESSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
