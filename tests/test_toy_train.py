"""The toy trainer: a run resumed after an interruption ends where an uninterrupted one does, and what it writes loads."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from tempomaster.errors import UsageError
from tempomaster.models.checkpoints import CheckpointPaths, load_models
from tempomaster.models.presets import get_preset
from tempomaster.runtime.schedule import shift_sigmas
from tempomaster.toy import config, dit_stage
from tempomaster.toy.state_files import load_state
from tempomaster.toy.train import ToyTrainConfig, train_toy

SMALL = ToyTrainConfig(
    vae_steps=3,
    vae_batch=1,
    vae_frames=5,
    latent_statistics_clips=4,
    vae_motion_steps=2,
    vae_motion_batch=1,
    vae_decoder_steps=2,
    vae_decoder_batch=1,
    clips=2,
    dit_steps=5,
    dit_batch=2,
    checkpoint_every=2,
)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    train_toy(tmp_path / "a", tmp_path / "a_out", SMALL, progress=False, echo=lambda m: None)

    real = dit_stage.dit_training_batch

    def interrupt(tasks, cfg, step, head_dim):
        if step == 3:
            raise KeyboardInterrupt
        return real(tasks, cfg, step, head_dim)

    monkeypatch.setattr(dit_stage, "dit_training_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_toy(tmp_path / "b", tmp_path / "b_out", SMALL, progress=False, echo=lambda m: None)
    assert not (tmp_path / "b_out").exists()  # nothing shipped from a broken run
    assert load_state(tmp_path / "b" / "dit.safetensors")["step"] == 2  # the last checkpoint before step 3
    monkeypatch.setattr(dit_stage, "dit_training_batch", real)
    train_toy(tmp_path / "b", tmp_path / "b_out", SMALL, progress=False, echo=lambda m: None)

    for rel in ("wan_video_dit_bf16.bin", "encoders/Wan2.1_VAE.pth", "encoders/models_t5_umt5-xxl-enc-bf16.pth"):
        a, b = _state(tmp_path / "a_out" / rel), _state(tmp_path / "b_out" / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
    # the shipped set loads through the release loader as the toy preset
    models = load_models(CheckpointPaths.from_dir(tmp_path / "a_out"), get_preset("toy"))
    assert models.dit.cfg.dim == get_preset("toy").dit.dim
    ids, _ = models.tokenizer(["a red ball bouncing on a striped background"])
    assert ids.shape == (1, get_preset("toy").t5.text_len) == (1, 32)  # the preset's text length, not the release's 512
    assert 2 not in ids[0, :9].tolist()  # no <unk>: every caption word is in the toy vocabulary
    motion = load_state(tmp_path / "a" / "vae-motion.safetensors")  # the motion fine-tune ran and folded
    assert (
        motion["folded"]
        and [r["step"] for r in motion["log"]] == [0, 1]
        and all(r["motion"] > 0 for r in motion["log"])
    )
    decoder = load_state(tmp_path / "a" / "vae-decoder.safetensors")  # the decoder fine-tune ran, unfolded
    assert not decoder.get("folded") and [r["step"] for r in decoder["log"]] == [0, 1]
    assert all(r["centroid_px"] >= 0 and r["motion"] > 0 for r in decoder["log"])
    for k, v in motion["model"].items():  # it trained the decoder alone: the latents the tasks were encoded with hold
        assert torch.equal(decoder["model"][k], v) == (not k.startswith(("decoder.", "conv2."))), k
    losses = [r["loss"] for r in load_state(tmp_path / "a" / "dit.safetensors")["log"]]
    assert len(losses) == SMALL.dit_steps and all(l > 0 for l in losses)


def test_a_work_folder_keeps_its_settings(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({"seed": 1}))
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "tm-export"),
            "train-toy",
            "--work",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--work" in proc.stderr and "other settings" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_work_folder_made_at_another_text_length_is_refused(tmp_path):
    from dataclasses import asdict

    from tempomaster.errors import UsageError
    from tempomaster.toy.train import ToyTrainConfig, train_toy

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({**asdict(ToyTrainConfig()), "text_len": 512}))
    with pytest.raises(UsageError, match="other settings"):
        train_toy(tmp_path / "w", tmp_path / "o", progress=False, echo=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_per_example_shifts_by_hand():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0, 0.25])
    # sigma = s u / (1 + (s - 1) u); s = 3: 0, 0.75/1.5, 1.5/2, 1; s = 5 at u = 0.25: 1.25/2
    shifts = torch.tensor([3.0, 3.0, 3.0, 3.0, 5.0])
    torch.testing.assert_close(shift_sigmas(u, shifts), torch.tensor([0.0, 0.5, 0.75, 1.0, 0.625]))


def test_folding_the_latent_statistics_keeps_the_round_trip_and_normalises():
    from tempomaster.toy.clips import render_clip, sample_clip_spec
    from tempomaster.toy.config import build_untrained_toy
    from tempomaster.toy.vae_stage import fold_latent_statistics, latent_statistics

    vae = build_untrained_toy(11).vae.double()
    video = render_clip(sample_clip_spec(3), 9)[None].double()
    with torch.no_grad():
        before = vae.decode(vae.encode(video), clamp=False)
        mean, std = latent_statistics(vae, seed=5, clips=4)
        assert (std - 1).abs().max() > 0.05 or mean.abs().max() > 0.05  # a random VAE is not normalised already
        fold_latent_statistics(vae, mean, std)
        after = vae.decode(vae.encode(video), clamp=False)
        mean2, std2 = latent_statistics(vae, seed=5, clips=4)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # normalize() computes in float32
    torch.testing.assert_close(mean2, torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(std2, torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-5)


def _train_toy_cli(*flags):
    return subprocess.run(
        [str(Path(sys.executable).parent / "tm-export"), "train-toy", "--no-progress", *flags],
        capture_output=True,
        text=True,
    )


def test_train_toy_help_states_the_trainers_defaults():
    from tempomaster.cli.export import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train-toy"]
    helps = {a.dest: a.help for a in sub._actions}
    defaults = ToyTrainConfig()
    for name in ("vae_steps", "clips", "dit_steps"):
        assert f"(default {getattr(defaults, name)})" in helps[name], (name, helps[name])


def test_an_out_folder_that_is_not_a_toy_set_is_refused_before_training(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    proc = _train_toy_cli("--work", str(tmp_path / "w"), "--out", str(precious))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--out" in proc.stderr and "Traceback" not in proc.stderr
    assert (precious / "notes.txt").read_text() == "keep me" and not (tmp_path / "w").exists()


def test_a_work_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "w").write_text("x")
    proc = _train_toy_cli("--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--work" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_loss_png_without_matplotlib_stops_before_training(tmp_path):
    # matplotlib hidden from the child by a stub that makes find_spec fail
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(
        "import importlib.util as u\n_f = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'matplotlib' else _f(name, *a, **k)\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=str(stub))
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "tm-export"),
            "train-toy",
            "--no-progress",
            "--work",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "o"),
            "--loss-png",
            str(tmp_path / "l.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr
    assert "matplotlib" in proc.stderr and ".[train]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_the_motion_term_is_the_error_of_the_frame_differences():
    from tempomaster.toy.clips import render_clip, sample_clip_spec
    from tempomaster.toy.vae_stage import motion_error

    clip = render_clip(sample_clip_spec(5, motion="sliding right"), 9)[None]  # [1, 3, 9, 64, 96]
    weight = 1.0 + torch.rand(1, 1, 9, 64, 96, generator=torch.Generator().manual_seed(0))
    assert motion_error(clip, clip, weight) == 0
    still = clip[:, :, :1].expand_as(clip)  # the first frame held: no motion at all
    by_hand = (torch.maximum(weight[:, :, 1:], weight[:, :, :-1]) * (clip[:, :, 1:] - clip[:, :, :-1]).abs()).mean()
    torch.testing.assert_close(motion_error(still, clip, weight), by_hand)
    assert by_hand > 1e-3


def test_without_the_motion_fine_tune_no_phase_runs(tmp_path):
    from tempomaster.toy.config import build_untrained_toy
    from tempomaster.toy.vae_stage import train_vae_motion

    models = build_untrained_toy(3)
    before = {k: v.clone() for k, v in models.vae.state_dict().items()}
    assert train_vae_motion(models, replace(ToyTrainConfig(), vae_motion_steps=0), tmp_path, progress=False) == []
    assert not any(tmp_path.iterdir())
    assert all(torch.equal(before[k], v) for k, v in models.vae.state_dict().items())


def test_the_soft_centroid_finds_the_object_where_the_colour_mask_does():
    from tempomaster.runtime.video import to_uint8_frames
    from tempomaster.toy.clips import object_centroids, render_clip, sample_clip_spec
    from tempomaster.toy.vae_stage import centroid_error, soft_object_centroids

    spec = sample_clip_spec(12, motion="sliding right", background="striped")
    clip = render_clip(spec, 9)  # [3, 9, 64, 96]
    soft, mass = soft_object_centroids(clip[None])
    hard = object_centroids(to_uint8_frames(clip), spec.colour)
    assert (mass > 30).all()
    torch.testing.assert_close(soft[0].double(), torch.from_numpy(hard).double(), atol=0.5, rtol=0)
    # the same clip moved 3 px right and 2 px down is 5 px away (L1) in every frame; itself, 0
    moved = torch.roll(clip, shifts=(2, 3), dims=(-2, -1))[None]
    torch.testing.assert_close(centroid_error(moved, clip[None]), torch.tensor(5.0), atol=0.3, rtol=0)
    assert centroid_error(clip[None], clip[None]) == 0


def test_the_decoder_fine_tune_leaves_the_encoder_as_it_was(tmp_path):
    from tempomaster.toy.config import build_untrained_toy
    from tempomaster.toy.vae_stage import train_vae_decoder

    models = build_untrained_toy(4)
    before = {k: v.clone() for k, v in models.vae.state_dict().items()}
    log = train_vae_decoder(models, SMALL, tmp_path, progress=False)  # 2 steps
    assert len(log) == 2 and (tmp_path / "vae-decoder.safetensors").is_file()
    after = models.vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "conv2.")) for k in changed)
    assert (
        train_vae_decoder(build_untrained_toy(4), replace(SMALL, vae_decoder_steps=0), tmp_path / "off", progress=False)
        == []
    )
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize(
    "prefix, unused, checkpoint",
    [
        ("vae_motion_", {"vae_motion_batch": 7, "vae_motion_lr": 1e-2}, "vae-motion.safetensors"),
        ("vae_decoder_", {"vae_decoder_lr": 1e-2, "vae_decoder_centroid_weight": 3.0}, "vae-decoder.safetensors"),
    ],
)
@pytest.mark.slow  # ~50 s each: real training steps
def test_a_work_folder_from_before_a_fine_tune_is_resumable(tmp_path, prefix, unused, checkpoint):
    older = {k: v for k, v in asdict(SMALL).items() if not k.startswith(prefix)}
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({**older, "text_len": 32}))
    # it ran without the fine-tune: accepted with the fine-tune off (its other settings then unused), refused with it on
    with pytest.raises(UsageError, match="other settings"):
        train_toy(tmp_path / "w", tmp_path / "o", SMALL, progress=False, echo=lambda m: None)
    without = replace(SMALL, **{prefix + "steps": 0}, **unused)
    train_toy(tmp_path / "w", tmp_path / "o", without, progress=False, echo=lambda m: None)
    assert (tmp_path / "o" / "wan_video_dit_bf16.bin").is_file() and not (tmp_path / "w" / checkpoint).exists()


def _train_dit_again(tmp_path, source: str, name: str, **kwargs) -> tuple[dict, list[str]]:
    """Rerun only the DiT phase of the run in ``source`` (its VAE and tasks reused) into a new work folder."""
    import shutil

    shutil.copytree(
        tmp_path / source, tmp_path / name, ignore=shutil.ignore_patterns("dit.safetensors", "summary.json")
    )
    said = []
    train_toy(tmp_path / name, tmp_path / f"{name}_out", SMALL, progress=False, echo=said.append, **kwargs)
    return load_state(tmp_path / name / "dit.safetensors"), said


@pytest.mark.slow  # ~50 s each: real training steps
def test_a_failed_compile_falls_back_to_the_eager_dit(tmp_path, monkeypatch):
    train_toy(tmp_path / "eager", tmp_path / "eager_out", SMALL, progress=False, echo=lambda m: None)
    eager = load_state(tmp_path / "eager" / "dit.safetensors")

    def compile_without_a_compiler(model, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no working C++ compiler found\n(details)")

        return fail

    monkeypatch.setattr(torch, "compile", compile_without_a_compiler)
    fallback, said = _train_dit_again(tmp_path, "eager", "fallback", compile_dit=True)
    assert any(
        "torch.compile failed (RuntimeError: no working C++ compiler found); training the DiT without it" in m
        for m in said
    )
    assert [r["loss"] for r in fallback["log"]] == [r["loss"] for r in eager["log"]]
    for k, v in eager["model"].items():
        assert torch.equal(fallback["model"][k], v), k


@pytest.mark.slow  # ~50 s each: real training steps
@pytest.mark.parametrize("compile_dit", [False, True])
def test_an_error_the_eager_step_hits_too_is_raised(tmp_path, monkeypatch, compile_dit):
    # compiled, the first failure is taken for the compiler's and retried eagerly, which fails again
    monkeypatch.setattr(dit_stage, "_loss_and_grads", lambda *a: (_ for _ in ()).throw(ValueError("a real bug")))
    with pytest.raises(ValueError, match="a real bug"):
        train_toy(tmp_path / "w", tmp_path / "o", SMALL, progress=False, echo=lambda m: None, compile_dit=compile_dit)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_compiled_dit_has_the_eager_loss_and_gradients():
    """torch.compile (about 40 s to compile on 2 cores) changes a training step only by float rounding."""
    from tempomaster.rope import batched_rope_table
    from tempomaster.toy.config import build_untrained_toy

    dit = build_untrained_toy(5).dit.train()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # the head starts at zero, which would leave every other gradient zero
        dit.head.head.weight.normal_(0.0, 0.02, generator=gen)
    f, h, w = 5, 8, 12
    text = get_preset("toy").t5
    cos, sin = batched_rope_table([[0, 1, 2, 3, 4], [0, 4, 8, 12, 16]], h // 2, w // 2, dit.cfg.head_dim)
    batch = (
        torch.randn(2, 16, f, h, w, generator=gen),
        torch.randn(2, 20, f, h, w, generator=gen),
        torch.rand(2, generator=gen),
        torch.randn(2, text.text_len, dit.cfg.text_dim, generator=gen),
        cos,
        sin,
        torch.randn(2, 16, f, h, w, generator=gen),
        1.0 + torch.rand(2, 1, f, h, w, generator=gen),
    )
    opt = torch.optim.SGD(dit.parameters(), lr=0.0)
    eager_loss = dit_stage._loss_and_grads(dit, opt, batch)
    eager = {n: p.grad.clone() for n, p in dit.named_parameters()}
    compiled_loss = dit_stage._loss_and_grads(torch.compile(dit, dynamic=False), opt, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for n, p in dit.named_parameters():
        scale = float(eager[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-3, atol=1e-3 * scale, msg=n)


def test_the_motion_fine_tune_draws_its_windows_at_the_strides_asked():
    from tempomaster.toy.vae_stage import vae_training_batch

    def mean_step(strides):  # mean absolute change between consecutive frames over 8 batches
        return sum(float(vae_training_batch(5, s, 4, 9, strides).diff(dim=2).abs().mean()) for s in range(8))

    # 6 fps windows move four times as far per frame as 24 fps ones (rendered from the same clip family)
    assert mean_step((4,)) > 2.0 * mean_step((1,))


@pytest.mark.slow  # ~50 s each: real training steps
def test_a_work_folder_from_before_the_motion_strides_is_resumable(tmp_path):
    older = {k: v for k, v in asdict(SMALL).items() if k != "vae_motion_strides"}
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({**older, "text_len": 32}))
    # it ran at every stride: refused with 6 fps windows only, accepted at the default
    with pytest.raises(UsageError, match="other settings"):
        train_toy(
            tmp_path / "w", tmp_path / "o", replace(SMALL, vae_motion_strides=(4,)), progress=False, echo=lambda m: None
        )
    assert SMALL.vae_motion_strides == (1, 2, 4)
    train_toy(tmp_path / "w", tmp_path / "o", SMALL, progress=False, echo=lambda m: None)
    assert (tmp_path / "o" / "wan_video_dit_bf16.bin").is_file()


def test_the_weighted_loss_by_hand():
    """The object-weighted flow-matching loss is sum(w e^2) / sum(w) over every element (float64 by hand);
    with no weight (object_loss_weight 0) it is the plain mean squared error."""
    from tempomaster.rope import batched_rope_table
    from tempomaster.toy.config import build_untrained_toy

    dit = build_untrained_toy(5).dit.train()
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        dit.head.head.weight.normal_(0.0, 0.02, generator=gen)
    f, h, w = 5, 8, 12
    cos, sin = batched_rope_table([[0, 1, 2, 3, 4], [0, 4, 8, 12, 16]], h // 2, w // 2, dit.cfg.head_dim)
    inputs = (
        torch.randn(2, 16, f, h, w, generator=gen),
        torch.randn(2, 20, f, h, w, generator=gen),
        torch.rand(2, generator=gen),
        torch.randn(2, get_preset("toy").t5.text_len, dit.cfg.text_dim, generator=gen),
        cos,
        sin,
    )
    target = torch.randn(2, 16, f, h, w, generator=gen)
    weight = 1.0 + 4.0 * (torch.rand(2, 1, f, h, w, generator=gen) < 0.25).float()
    opt = torch.optim.SGD(dit.parameters(), lr=0.0)
    with torch.no_grad():
        x_t, y, sigma, context, cos, sin = inputs  # the model takes the timestep as 1000 sigma
        error = (
            dit(x_t, y, sigma * 1000.0, context, cos, sin, timestep_per_sample=True).double() - target.double()
        ) ** 2
    by_hand = float((error * weight.double()).sum() / (weight.double().expand_as(error)).sum())
    assert abs(dit_stage._loss_and_grads(dit, opt, (*inputs, target, weight)).item() - by_hand) < 1e-5 * by_hand
    plain = dit_stage._loss_and_grads(dit, opt, (*inputs, target, None)).item()
    assert abs(plain - float(error.mean())) < 1e-5 * plain and abs(plain - by_hand) > 1e-3 * plain


def test_the_object_weight_falls_where_the_tasks_object_is(tmp_path):
    """Every DiT batch weighs the latent pixels its rows' object covers 1 + object_loss_weight, the rest 1,
    and each row's first latent frame 1 + first_frame_loss_weight times that;
    a shard written before the object maps gets them drawn again, equal to those a fresh build makes."""
    from tempomaster.toy.config import build_untrained_toy
    from tempomaster.toy.dit_stage import dit_training_batch
    from tempomaster.toy.tasks import build_task_set

    cfg = replace(SMALL, clips=3, object_loss_weight=4.0)
    models = build_untrained_toy(cfg.seed)
    with torch.no_grad():
        tasks = build_task_set(models, cfg, tmp_path, progress=False)
    assert tasks.object.shape == (9, 5, 8, 12) and tasks.object.dtype == torch.bool
    assert 0.05 < float(tasks.object.float().mean()) < 0.6  # a small object on a large background
    for step in range(3):
        *_, weight = dit_training_batch(tasks, cfg, step, models.dit.cfg.head_dim)
        later, first = weight[:, :, 1:], weight[:, :, 0]
        assert set(later.unique().tolist()) <= {1.0, 5.0} and (later == 5.0).any()
        # the first latent frame: 1 + first_frame_loss_weight (4) times the object's weight
        assert set(first.unique().tolist()) <= {5.0, 25.0} and (first == 5.0).any()
    assert cfg.first_frame_loss_weight == 4.0
    unweighted = replace(cfg, object_loss_weight=0.0, first_frame_loss_weight=0.0)
    assert dit_training_batch(tasks, unweighted, 0, models.dit.cfg.head_dim)[-1] is None
    *_, first_only = dit_training_batch(tasks, replace(cfg, object_loss_weight=0.0), 0, models.dit.cfg.head_dim)
    assert (first_only[:, :, 0] == 5.0).all() and (first_only[:, :, 1:] == 1.0).all()
    # a shard an earlier version pickled, from before the object maps: read safely, completed, saved anew
    shard = tmp_path / "tasks-00000.safetensors"
    older = load_state(shard)
    fresh = older.pop("object")
    shard.unlink()
    torch.save(older, tmp_path / "tasks-00000.pt")
    with torch.no_grad():
        again = build_task_set(models, cfg, tmp_path, progress=False)
    assert torch.equal(again.object, fresh) and "object" in load_state(shard)
    assert torch.equal(again.x0, tasks.x0)


def test_a_work_folder_from_before_the_loss_weights_reads_them_as_off():
    """A run saved before the object and first-frame weights existed trained without them: its folder
    matches settings with both at 0 and no others (so it resumes only as what it was)."""
    settings = json.loads(json.dumps({**asdict(ToyTrainConfig()), "text_len": 32}))
    older = {k: v for k, v in settings.items() if k not in ("object_loss_weight", "first_frame_loss_weight")}
    off = {**settings, "object_loss_weight": 0.0, "first_frame_loss_weight": 0.0}
    assert config.comparable_settings(older) == config.comparable_settings(off)
    assert config.comparable_settings(older) != config.comparable_settings(settings)
    first_only = {k: v for k, v in settings.items() if k != "first_frame_loss_weight"}
    assert config.comparable_settings(first_only) == config.comparable_settings(
        {**settings, "first_frame_loss_weight": 0.0}
    )
