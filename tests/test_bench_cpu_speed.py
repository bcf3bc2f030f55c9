"""The pieces of benchmarks/bench_cpu_speed.py's release comparison that run without the release."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from benchmarks.release_child import ReleaseProbe, center_crop
from tempomaster.models.checkpoints import CheckpointPaths, load_models
from tempomaster.models.dit import WanDiT
from tempomaster.models.presets import DiTConfig
from tempomaster.models.tiny import build_tiny_models, release_config, write_release_checkpoints
from tests.checkpoint_layouts import layout


def _odd_models():
    """The tiny set with a DiT of another shape (3 heads, 1 block, width 96), weights rounded to bf16 values."""
    models = build_tiny_models()
    cfg = DiTConfig(dim=96, ffn_dim=160, num_heads=3, num_layers=1, text_dim=models.preset.dit.text_dim)
    torch.manual_seed(7)
    dit = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_().copy_(p.to(torch.bfloat16).float())
    return dataclasses.replace(models, dit=dit, preset=dataclasses.replace(models.preset, dit=cfg))


def test_written_release_set_reads_back_through_our_loader_bit_for_bit(tmp_path):
    models = _odd_models()
    out = tmp_path / "ckpt"
    write_release_checkpoints(models, out, release_config(out, models.preset))
    config = json.loads((out / "inference_configs.json").read_text())
    assert config["model_configs"]["wan_video_dit_config"]["num_heads"] == 3
    assert config["model_configs"]["wan_video_dit_config"]["dim"] == 96
    # the release config's declared DiT shape is checked against the tensors by the loader
    loaded = load_models(CheckpointPaths.from_release_config(out / "inference_configs.json"))
    assert loaded.preset.dit.num_heads == 3 and loaded.preset.dit.num_layers == 1
    for name in ("dit", "t5", "vae"):
        want, got = getattr(models, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(want) == set(got), name
        for key, value in want.items():
            assert torch.equal(value.float(), got[key].float()), f"{name} {key}"
    # the DiT file has the release's key names (block 0 of the documented layout, repeated per block)
    dit_keys = set(torch.load(out / "wan_video_dit_bf16.bin", weights_only=True))
    assert dit_keys == set(layout("DiT"))
    assert torch.load(out / "wan_video_dit_bf16.bin", weights_only=True)["head.head.weight"].dtype == torch.bfloat16


def test_weights_that_are_not_bf16_values_are_refused_and_nothing_is_written(tmp_path):
    models = _odd_models()
    with torch.no_grad():
        models.dit.blocks[0].ffn[0].weight[0, 0] += 1e-4  # no longer a bf16 value
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0\.weight.*not a bf16 value"):
        write_release_checkpoints(models, out, release_config(out, models.preset))
    assert list(tmp_path.iterdir()) == []


def test_center_crop_offsets_follow_torchvision():
    img = torch.arange(5 * 8, dtype=torch.float32).reshape(1, 5, 8)
    # (5 - 2) / 2 = 1.5 -> round 2; (8 - 3) / 2 = 2.5 -> round 2 (half to even, as Python's round)
    assert torch.equal(center_crop(img, (2, 3)), img[:, 2:4, 2:5])
    assert torch.equal(center_crop(img, 4), img[:, 0:4, 2:6])
    with pytest.raises(NotImplementedError):
        center_crop(img, (6, 3))


class _FakeVAE:
    def encode(self, videos, device, **kwargs):
        time.sleep(0.01)
        return videos * 2

    def decode(self, latents, device, **kwargs):
        time.sleep(0.02)
        return latents - 1


class _FakeScheduler:
    def __init__(self):
        self.set = []

    def set_timesteps(self, num_inference_steps, **kwargs):
        self.set.append(num_inference_steps)


class _FakePipe:
    """The release pipeline's call order: prompts, reference encode, then per stage schedule/encode/DiT/decode."""

    def __init__(self):
        self.vae, self.scheduler, self.dit = _FakeVAE(), _FakeScheduler(), torch.nn.Linear(4, 4)
        self.prompter = type("P", (), {"encode_prompt": lambda self, text, positive=True, device="cpu": text})()

    def tensor2video(self, frames):
        return ["frame"] * frames.shape[1]

    def run(self):
        x = torch.randn(1, 3, 5, 4)
        assert self.prompter.encode_prompt("a ball") == "a ball"
        assert torch.equal(self.vae.encode(x, device="cpu"), x * 2)  # the stage-0 reference encode
        for stage in range(2):
            self.scheduler.set_timesteps(3 + stage)
            if stage:
                self.vae.encode(x, device="cpu")
            for _ in range(2 + stage):
                self.dit(torch.randn(2, 4))
            frames = self.vae.decode(x, device="cpu")
            assert self.tensor2video(frames[0]) == ["frame"] * 5
        return frames


def test_release_probe_times_calls_per_stage_and_passes_them_through():
    pipe = _FakePipe()
    probe = ReleaseProbe(pipe)
    frames = pipe.run()
    end = time.perf_counter()
    assert pipe.scheduler.set == [3, 4]
    assert torch.equal(probe.frames, frames[0])
    kinds = [(c["method"], c["stage"]) for c in probe.calls]
    assert kinds == [
        ("encode_text", 0),
        ("vae_encode", 0),
        ("velocity", 0),
        ("velocity", 0),
        ("vae_decode", 0),
        ("vae_encode", 1),
        ("velocity", 1),
        ("velocity", 1),
        ("velocity", 1),
        ("vae_decode", 1),
    ]
    stages = probe.stages(end)
    assert [s["vae_encode_calls"] for s in stages] == [1, 1]
    for s in stages:
        # each stage slept 10 ms encoding and 20 ms decoding; its window holds them
        assert 0.03 <= s["vae_seconds"] <= s["seconds"]
        assert 0 < s["vae_share"] <= 1
    # stage 0 starts at the reference encode, before its schedule is set
    first_encode = next(c for c in probe.calls if c["method"] == "vae_encode")
    assert stages[0]["seconds"] >= first_encode["seconds"] + 0.02
