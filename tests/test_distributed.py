"""Many processes on CPU (gloo): Ulysses DiT forward, chunk/CFG/sequence split, many videos, faults.

The four-process checks share one launch (starting ranks dominates the time
on this machine); the ranks return plain numbers and numpy frames, and the
tests below assert on them against one-process runs made here.  The 2-rank
Ulysses check uses the 2-rank subgroups of that 4-rank world.
"""

import os
import signal
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from tempomaster.errors import MissingDependencyError, UsageError
from tempomaster.models.dit import SequenceParallel, WanDiT
from tempomaster.models.presets import get_preset
from tempomaster.parallel_plan import plan_schedule
from tempomaster.rope import batched_rope_table
from tempomaster.runtime.backends.factory import TorchBackendFactory
from tempomaster.runtime.backends.torch import TorchBackend
from tempomaster.runtime.distributed import WorkerError
from tempomaster.runtime.pipeline import GenerationRequest, generate
from tempomaster.runtime.workers import VideoJob, launch, parse_devices, run_videos

FAST = dict(
    height=32, width=48, num_frames=9, steps_per_stage=(2, 1, 1), shift_per_stage=(5.0, 3.0, 3.0), guidance_scale=5.0
)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------
# What the ranks run (module level: the spawned processes import it)
# ----------------------------------------------------------------------------


def _dit_inputs(cfg, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    f, h, w = 3, 4, 6  # 3 * 2 * 3 = 18 tokens: uneven over 4 ranks (5, 5, 4, 4)
    x = torch.randn(batch, 16, f, h, w, generator=g, dtype=dtype)
    y = torch.randn(batch, 20, f, h, w, generator=g, dtype=dtype)
    ctx = torch.randn(batch, 512, cfg.text_dim, generator=g, dtype=dtype)
    t = torch.tensor([731.0], dtype=dtype)
    cos, sin = batched_rope_table([[0, 4, 8], [12, 16, 20]][:batch], h // 2, w // 2, cfg.head_dim)
    return x, y, t, ctx, cos, sin


def _four_head_dit(dtype):
    cfg = replace(get_preset("tiny").dit, num_heads=4)  # 4 heads of 16 so that 4 ranks get one each
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return WanDiT(cfg).to(dtype).eval()


def sharded_dit_forward(world):
    """Per SP degree and dtype: max |sharded - unsharded| over the whole output, on this rank."""
    halves = [world.group((0, 1)), world.group((2, 3))]
    whole = world.group((0, 1, 2, 3))
    diffs = {}
    for dtype in (torch.float32, torch.float64):
        dit = _four_head_dit(dtype)
        inputs = _dit_inputs(dit.cfg, 2, dtype)
        with torch.inference_mode():
            full = dit(*inputs)
            for d, sp in (
                (2, SequenceParallel(halves[world.rank // 2], world.rank % 2, 2)),
                (4, SequenceParallel(whole, world.rank, 4)),
            ):
                diffs[(d, str(dtype))] = (dit(*inputs, sequence_parallel=sp) - full).abs().max().item()
    return diffs


class _Delegate:
    """Stands for an engine backend: same calls, but no Ulysses hook, so chunk/CFG split only."""

    def __init__(self, inner):
        self.inner, self.info, self.device, self.name = inner, inner.info, inner.device, "engine-like"

    def encode_text(self, *args):
        return self.inner.encode_text(*args)

    def velocity(self, *args):
        return self.inner.velocity(*args)

    def vae_encode(self, *args):
        return self.inner.vae_encode(*args)

    def vae_decode(self, *args):
        return self.inner.vae_decode(*args)


class EngineLikeFactory:
    def __call__(self, device):
        backend, tokenizer = TorchBackendFactory(preset="tiny")(device)
        return _Delegate(backend), tokenizer


def frames_of(result):
    return [s.frames.numpy().copy() for s in result.stages]


def world_checks(world, jobs_single, jobs_many):
    """The four-process run: the DiT check, one video on all 4 ranks, then three videos on groups [2, 1, 1]."""
    out = {"dit": sharded_dit_forward(world)}
    factory = TorchBackendFactory(preset="tiny")
    one = run_videos(world, jobs_single, factory, write=False, keep_frames=True)
    out["single"] = [(i, frames_of(r), rep.backend, rep.dit_calls, placements) for i, (rep, r, placements) in one]
    plain = run_videos(world, jobs_single, EngineLikeFactory(), write=False, keep_frames=True)
    out["engine-like"] = [(i, frames_of(r), placements) for i, (_, r, placements) in plain]
    many = run_videos(world, jobs_many, factory, write=True, keep_frames=True)
    out["many"] = [(i, frames_of(r), rep.ranks, rep.paths) for i, (rep, r, _) in many]
    return out


class _FaultyBackend:
    """A torch backend whose rank `rank` dies (SIGKILL), is stopped (SIGSTOP) or hangs at its `at`-th DiT call."""

    def __init__(self, inner, rank, at, how):
        self.inner, self.rank, self.at, self.how, self.calls = inner, rank, at, how, 0
        self.info, self.device, self.name, self.dit = inner.info, inner.device, inner.name, inner.dit

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def velocity(self, *args):
        self.calls += 1
        if self.calls == self.at and int(os.environ["RANK"]) == self.rank:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)
        return self.inner.velocity(*args)


class FaultyFactory:
    def __init__(self, rank, at, how):
        self.rank, self.at, self.how = rank, at, how

    def __call__(self, device):
        backend, tokenizer = TorchBackendFactory(preset="tiny")(device)
        return _FaultyBackend(backend, self.rank, self.at, self.how), tokenizer


def faulty_run(world, jobs, how):
    return run_videos(world, jobs, FaultyFactory(rank=1, at=3, how=how), sequence_parallel=False)


# ----------------------------------------------------------------------------
# One-process references
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_video(tiny_models):
    backend = TorchBackend(tiny_models)
    request = GenerationRequest(prompt="a red ball bouncing", seed=3, **FAST)
    return request, frames_of(generate(backend, tiny_models.tokenizer, request, progress=False))


PROMPTS = ["a red ball bouncing", "a cat on a sofa", "waves at night"]


@pytest.fixture(scope="module")
def many_singles(tiny_models):
    backend = TorchBackend(tiny_models)
    requests = [GenerationRequest(prompt=p, seed=10 + i, **FAST) for i, p in enumerate(PROMPTS)]
    # each of the 4 ranks runs cores // 4 threads (workers.launch); bit-identity needs the same reduction order
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 4))
    try:
        return requests, [frames_of(generate(backend, tiny_models.tokenizer, r, progress=False)) for r in requests]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def four_ranks(single_video, many_singles, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    jobs_single = [VideoJob("one", single_video[0], out / "one.mp4")]
    jobs_many = [VideoJob(f"v{i}", r, out / f"v{i}.mp4") for i, r in enumerate(many_singles[0])]
    results = launch(world_checks, (jobs_single, jobs_many), devices=[CPU] * 4, timeout=120)
    return results, out


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def test_sharded_dit_forward_equals_unsharded_over_2_and_4_ranks(four_ranks):
    results, _ = four_ranks
    for rank, res in enumerate(results):
        diffs = res["dit"]
        for d in (2, 4):
            assert diffs[(d, "torch.float32")] < 1e-5, (rank, d, diffs)
            # float64: only rounding differs, so the split itself is exact
            assert diffs[(d, "torch.float64")] < 1e-12, (rank, d, diffs)


def test_sequence_parallel_hook_off_changes_nothing():
    dit = _four_head_dit(torch.float64)
    inputs = _dit_inputs(dit.cfg, 2, torch.float64, seed=5)

    class OneRank(SequenceParallel):
        # a group of one: the sharding/gathering paths run without any exchange
        def tokens_to_heads(self, x, tokens):
            return x

        def heads_to_tokens(self, x):
            return x

        def gather_tokens(self, x, tokens):
            return x

    with torch.inference_mode():
        full = dit(*inputs)
        hooked = dit(*inputs, sequence_parallel=OneRank(None, 0, 1))
    assert torch.equal(full, hooked)
    assert full.abs().max() > 0.1


def _within(a, b, tol=1 / 255):
    return all(np.abs(x - y).max() <= tol for x, y in zip(a, b))


def test_four_ranks_video_equals_single_process(four_ranks, single_video):
    results, _ = four_ranks
    _, reference = single_video
    produced = [item for res in results for item in res["single"]]
    assert len(produced) == 1  # only rank 0 of the group reports (and would write)
    _, frames, backend_name, dit_calls, placements = produced[0]
    assert backend_name == "torch x4" and dit_calls == 4
    # the run placed its DiT calls as the plan says (tiny: 2 heads): stage 0 split into 2 groups x SP 2
    request = single_video[0]
    plan = plan_schedule(
        devices=4,
        num_heads=2,
        num_frames=request.num_frames,
        frame_intervals=request.frame_intervals,
        steps_per_stage=request.steps_per_stage,
        guidance_scale=request.guidance_scale,
        height=request.height,
        width=request.width,
    )
    expected = [s.placement for s in plan.stages for _ in range(s.steps)]
    assert placements == expected
    assert [(p.sequences, p.groups, p.sp_degree) for p in placements] == [(2, 2, 2), (2, 2, 2), (4, 4, 1), (8, 4, 1)]
    assert [f.shape[1] for f in frames] == [9, 18, 36]
    assert _within(frames, reference), [np.abs(x - y).max() for x, y in zip(frames, reference)]
    # in uint8 the frames are the same up to one level
    for x, y in zip(frames, reference):
        qx, qy = [np.round((v + 1) * 127.5).astype(np.int16) for v in (x, y)]
        assert np.abs(qx - qy).max() <= 1


def test_backend_without_ulysses_falls_back_to_chunk_cfg_split(four_ranks, single_video):
    results, _ = four_ranks
    request, reference = single_video
    ((_, frames, placements),) = [item for res in results for item in res["engine-like"]]
    plan = plan_schedule(
        devices=4,
        num_heads=2,
        num_frames=request.num_frames,
        frame_intervals=request.frame_intervals,
        steps_per_stage=request.steps_per_stage,
        guidance_scale=request.guidance_scale,
        height=request.height,
        width=request.width,
        sequence_parallel=False,
    )
    assert placements == [s.placement for s in plan.stages for _ in range(s.steps)]
    # stage 0: cond on rank 0, uncond on rank 1, ranks 2 and 3 idle
    assert [(p.groups, p.sp_degree) for p in placements] == [(2, 1), (2, 1), (4, 1), (4, 1)]
    assert _within(frames, reference)


def test_many_videos_on_groups_of_ranks(four_ranks, many_singles):
    results, folder = four_ranks
    _, references = many_singles
    produced = sorted(item[:3] for res in results for item in res["many"])
    assert [(i, ranks) for i, _, ranks in produced] == [(0, (0, 1)), (1, (2,)), (2, (3,))]
    # each video written once, by its group's first rank; the single-video run wrote nothing
    written = sorted(p for res in results for item in res["many"] for p in item[3])
    assert written == [folder / f"v{i}.mp4" for i in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert all(p.stat().st_size > 1000 for p in written)
    for i, frames, ranks in produced:
        if len(ranks) == 1:  # a group of one runs exactly the one-process code
            assert all(np.array_equal(x, y) for x, y in zip(frames, references[i]))
        else:
            assert _within(frames, references[i])
    assert not np.allclose(produced[1][1][-1], produced[2][1][-1])


@pytest.mark.parametrize(
    "how, expected",
    [
        ("kill", "rank 1 died"),
        ("hang", "rank 1 hangs"),
        ("stop", "rank 1 does not answer"),
    ],
)
def test_failed_rank_stops_all_with_one_line(tmp_path, how, expected):
    out = tmp_path / "v.mp4"
    jobs = [VideoJob("v", GenerationRequest(prompt="x", seed=1, **FAST), out)]
    start = time.perf_counter()
    with pytest.raises(WorkerError) as info:
        launch(faulty_run, (jobs, how), devices=[CPU] * 2, timeout=4)
    message = str(info.value)
    assert expected in message and "\n" not in message and info.value.culprit == 1
    assert time.perf_counter() - start < 30
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_stopped_rank_is_not_reported_dead():
    from tempomaster.runtime.distributed import pid_namespace, process_state

    host = pid_namespace()
    child = __import__("subprocess").Popen(["sleep", "30"])
    try:
        assert process_state(f"{host} {child.pid}") == "alive"
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert process_state(f"{host} {child.pid}") == "stopped"
        os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.2)
        assert process_state(f"{host} {child.pid}") == "gone"  # a zombie until reaped
        child.wait()
        assert process_state(f"{host} {child.pid}") == "gone"
        assert process_state(f"another-{host} {child.pid}") == "unknown"  # another host: cannot tell
    finally:
        child.kill()
        child.wait()


def test_ctrl_c_in_launcher_stops_every_rank():
    pids = []

    def interrupted(started):
        pids.extend(started)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch(sharded_dit_forward, (), devices=[CPU] * 2, timeout=30, on_start=interrupted)
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_parse_devices():
    assert parse_devices("cpu:3") == [CPU] * 3
    assert parse_devices("cpu,cpu") == [CPU] * 2
    for bad in ("", "cpu:0", "a,b", "0,0", "cpu:x"):
        with pytest.raises(UsageError):
            parse_devices(bad)
    if not torch.cuda.is_available():
        with pytest.raises(MissingDependencyError, match="cpu:2"):
            parse_devices("0,1")


TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
from tempomaster.runtime.pipeline import GenerationRequest
from tempomaster.runtime.backends.factory import TorchBackendFactory
from tempomaster.runtime.workers import VideoJob, generate_videos
FAST = {fast!r}
out = Path(sys.argv[1])
jobs = [VideoJob(f"v{{i}}", GenerationRequest(prompt=p, seed=i, **FAST), out / f"v{{i}}.mp4") for i, p in enumerate(["a", "b", "c"])]
for report in generate_videos(jobs, TorchBackendFactory(preset="tiny"), timeout=60):
    print("REPORT", report.name, report.ranks)
"""


@pytest.mark.slow
def test_torchrun_environment_joins_the_group(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(fast=FAST))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", str(script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = sorted(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    # 3 videos on 2 groups of one rank: v0 and v2 on rank 0, v1 on rank 1, each printed once
    assert reports == ["REPORT v0 (0,)", "REPORT v1 (1,)", "REPORT v2 (0,)"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v0.mp4", "v1.mp4", "v2.mp4"]


def test_read_prompts(tmp_path):
    from tempomaster.runtime.request import read_prompts

    f = tmp_path / "prompts.txt"
    f.write_text("a red ball\n\n# a comment\n  waves at night  \n", encoding="utf-8")
    assert read_prompts(f) == ["a red ball", "waves at night"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n", encoding="utf-8")
    for bad in (tmp_path / "empty.txt", tmp_path / "missing.txt"):
        with pytest.raises(UsageError, match="--prompts"):
            read_prompts(bad)


def test_plan_for_request_plans_the_output_size():
    from PIL import Image

    from tempomaster.runtime.workers import plan_for_request

    # a portrait reference image turns 32x48 into 48x32 (same area): the tokens follow the output size
    request = GenerationRequest(prompt="x", ref_images={0: Image.new("RGB", (20, 30))}, **FAST)
    assert request.output_size() == (48, 32)
    plan = plan_for_request(request, devices=4, num_heads=2, forward_seconds=0.5)
    assert [s.tokens for s in plan.stages] == [3 * 3 * 2] * 3
    assert [(s.placement.groups, s.placement.sp_degree) for s in plan.stages] == [(2, 2), (4, 1), (4, 1)]
    # 2 steps of 1/2 forward, then 1 step of 1, then 1 step of 2
    assert plan.seconds() == pytest.approx((2 * 0.5 + 1 + 2) * 0.5)


# ----------------------------------------------------------------------------
# What a run listens on
# ----------------------------------------------------------------------------

LISTEN_SCRIPT = """
import time

import torch
import torch.distributed as dist

from tempomaster.runtime.workers import launch


def exchange(world):
    flag = torch.full((1,), float(world.rank + 1))
    dist.all_reduce(flag)
    time.sleep(2)  # the run's sockets stay open while the test looks
    return float(flag)


if __name__ == "__main__":
    print("RESULT", launch(exchange, devices=[torch.device("cpu")] * 2, timeout=60))
"""


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _listening_sockets(pids) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds (/proc/net/tcp, tcp6)."""
    import ipaddress

    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            rows = fh.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((owner[fields[9]], str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _routable_interface() -> str | None:
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            flags = int(open(f"/sys/class/net/{name}/flags").read(), 16)
        except (OSError, ValueError):
            continue
        if flags & 0x1 and not flags & 0x8:  # IFF_UP, not IFF_LOOPBACK
            return name
    return None


def test_a_run_listens_on_loopback_only(tmp_path):
    """During a 2-rank gloo run, every listening socket of the launcher, its fork server and its ranks (the
    rendezvous store, gloo's) is on a loopback address, even when the user's shell names another interface
    for gloo (where this machine has one)."""
    import subprocess

    env = dict(os.environ)
    interface = _routable_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    script = tmp_path / "run.py"
    script.write_text(LISTEN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: set[tuple[int, str, int]] = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening_sockets(_process_tree(proc.pid))
        time.sleep(0.05)
    proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "RESULT [3.0, 3.0]" in out
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, exposed
    # not vacuous: the launcher's store and the ranks' gloo sockets were seen
    assert proc.pid in {pid for pid, _, _ in seen} and len({pid for pid, _, _ in seen}) >= 2, seen
