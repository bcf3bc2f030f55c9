"""The release's own inputs: a checkpoint set whose shapes are no preset's loads and runs as its files say.

The set here is the release's layout with random weights: a DiT of width 64
(the tiny preset's width, so a preset is guessed from it) with 3 layers, FFN
96 and 4 heads, which no preset has; the standard-width Wan2.1 VAE (dim 96);
a small umT5. A guessed preset lends defaults only: the VAE's width and the
DiT's heads come from the files and the release config.
"""

import json

import numpy as np
import pytest
import torch

from tempomaster.cli import run_main
from tempomaster.models.checkpoints import (
    DIT_FILE,
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    CheckpointPaths,
    ModelSet,
    load_models,
)
from tempomaster.models.presets import DiTConfig, Preset, T5Config, VAEConfig, get_preset
from tempomaster.runtime.video import read_video_frames, to_uint8_frames

DIT = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=3, text_dim=32)
VAE = VAEConfig()  # the release's: dim 96
T5 = T5Config(vocab_size=384, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=1)
REQUEST = dict(
    prompt="a small boat on a lake",
    num_frames=1,
    height=16,
    width=16,
    frame_intervals=(2, 1),
    steps_per_stage=(2, 1),
    shift_per_stage=(3.0, 3.0),
    guidance_scale=4.0,
    seed=7,
)
FLAGS = [
    "--prompt",
    REQUEST["prompt"],
    "--num-frames",
    "1",
    "--height",
    "16",
    "--width",
    "16",
    "--intervals",
    "2,1",
    "--steps",
    "2,1",
    "--shifts",
    "3,3",
    "--guidance",
    "4",
    "--seed",
    "7",
    "--no-progress",
]


def _random_state(model, seed: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.2).to(dtype) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def release_set(tmp_path_factory):
    """(checkpoint folder, inference_configs.json) of a set whose DiT is no preset's and whose VAE is full width."""
    from tempomaster.models.dit import WanDiT
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.tokenizer import build_tiny_tokenizer
    from tempomaster.models.vae import WanVAE

    root = tmp_path_factory.mktemp("release") / "checkpoints"
    (root / "encoders").mkdir(parents=True)
    with torch.device("meta"):
        dit, vae, t5 = WanDiT(DIT), WanVAE(VAE), UMT5Encoder(T5)
    torch.save(_random_state(dit, 1, torch.bfloat16), root / DIT_FILE)
    torch.save(_random_state(t5, 2, torch.bfloat16), root / T5_FILE)
    vae_state = _random_state(vae, 3, torch.float32)
    for k, v in vae_state.items():  # norms near 1 keep a random 96-wide VAE's activations finite
        if k.endswith("gamma"):
            vae_state[k] = 1 + 0.05 * v
    torch.save(vae_state, root / VAE_FILE)
    build_tiny_tokenizer(root / TOKENIZER_DIR)
    config = {
        "model_configs": {
            "wan_video_text_encoder_path": str(root / T5_FILE),
            "wan_video_vae_path": str(root / VAE_FILE),
            "wan_video_dit_path": str(root / DIT_FILE),
            "wan_video_dit_config": {
                "has_image_input": False,
                "patch_size": [1, 2, 2],
                "in_dim": 36,
                "dim": 64,
                "ffn_dim": 96,
                "freq_dim": 256,
                "text_dim": 32,
                "out_dim": 16,
                "num_heads": 4,
                "num_layers": 3,
                "eps": 1e-6,
                "has_image_pos_emb": False,
            },
        },
        "inference_configs": {"tile": False},
        "inference_cases": {},
    }
    config_path = root / "inference_configs.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return root, config_path


def test_dimensions_come_from_the_files_not_the_guessed_preset(release_set):
    from tempomaster.models.checkpoints import checkpoint_preset

    root, config = release_set
    preset = checkpoint_preset(CheckpointPaths.from_release_config(config))
    assert preset.dit == DIT
    assert (preset.vae.dim, preset.vae.z_dim) == (96, 16)
    assert (preset.t5.dim, preset.t5.num_layers, preset.t5.text_len) == (32, 1, 512)
    # the preset of the DiT's width lends its defaults (sizes, steps), nothing more
    assert preset.name == "tiny" and preset.defaults == get_preset("tiny").defaults
    # without the release config the heads are the guessed preset's: the tensors cannot tell them
    assert checkpoint_preset(CheckpointPaths.from_dir(root)).dit.num_heads == get_preset("tiny").dit.num_heads


def test_release_config_generates_the_frames_of_models_built_from_the_files(release_set, tmp_path):
    from tempomaster.models.dit import WanDiT
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.tokenizer import PromptTokenizer
    from tempomaster.models.vae import WanVAE
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    root, config = release_set
    assert run_main(["generate", "--config", str(config), "--out", str(tmp_path / "run"), *FLAGS]) == 0
    ours, _ = read_video_frames(tmp_path / "run" / "video")

    # the same files put into models by hand: no preset, no loader of the package
    models = []
    for cls, cfg, name in ((WanDiT, DIT, DIT_FILE), (WanVAE, VAE, VAE_FILE), (UMT5Encoder, T5, T5_FILE)):
        model = cls(cfg)
        state = torch.load(root / name, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        models.append(model.eval())
    tokenizer = PromptTokenizer.from_dir(root / TOKENIZER_DIR, seq_len=512)
    preset = Preset(name="by-hand", dit=DIT, vae=VAE, t5=T5)  # TorchBackend reads the text length (512) here
    backend = TorchBackend(ModelSet(preset=preset, dit=models[0], vae=models[1], t5=models[2], tokenizer=tokenizer))
    result = generate(backend, tokenizer, GenerationRequest(**REQUEST), progress=False)
    expected = to_uint8_frames(result.video.frames)
    assert ours.shape == expected.shape == (2, 16, 16, 3)
    assert np.array_equal(ours, expected)
    assert expected.std() > 1  # a real picture, not a constant


def test_checkpoint_folder_of_the_same_set_generates(release_set, tmp_path, capsys):
    root, _ = release_set
    assert run_main(["generate", "--checkpoints", str(root), "--out", str(tmp_path / "v"), *FLAGS]) == 0
    frames, _ = read_video_frames(tmp_path / "v" / "video")
    assert frames.shape == (2, 16, 16, 3)


@pytest.mark.parametrize("source", ["--config", "--checkpoints"])
def test_a_typed_preset_that_disagrees_with_the_files_is_refused_naming_the_flag(release_set, tmp_path, capsys, source):
    root, config = release_set
    value = config if source == "--config" else root
    rc = run_main(["generate", source, str(value), "--preset", "tiny", "--out", str(tmp_path / "v.mp4"), *FLAGS])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "--preset tiny" in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()


def test_loader_takes_the_full_width_vae_as_it_is(release_set):
    root, _ = release_set
    models = load_models(CheckpointPaths.from_dir(root))
    assert models.vae.cfg.dim == 96
    assert models.dit.cfg.num_layers == 3 and models.dit.cfg.ffn_dim == 96


def test_loader_reads_a_diffusers_made_standard_width_vae_put_in_the_release_layout(release_set, tmp_path):
    """A VAE made by diffusers (the peer), renamed to Wan2.1_VAE.pth's keys, loads through the checkpoint loader
    beside a DiT of another preset's width, and decodes as diffusers does."""
    import shutil

    from vae_diffusers_keys import wan_vae_to_diffusers

    from tempomaster.models.vae import LATENTS_MEAN, LATENTS_STD, WanVAE

    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(base_dim=96, z_dim=16)
        ours_meta = WanVAE(VAE)
    # the release's key of every diffusers key, from our renaming (a bijection)
    release_keys = list(ours_meta.state_dict())
    markers = {k: torch.tensor(i) for i, k in enumerate(release_keys)}
    to_release = {d: release_keys[int(v)] for d, v in wan_vae_to_diffusers(markers).items()}
    gen = torch.Generator().manual_seed(11)
    state = {}
    for name, p in ref.state_dict().items():
        if p.is_floating_point() and name in to_release:
            scale = 0.1 if name.endswith("gamma") else 0.05
            state[name] = (1.0 if name.endswith("gamma") else 0.0) + scale * torch.randn(p.shape, generator=gen)
    assert set(state) == set(to_release)
    ref.load_state_dict(state, strict=False, assign=True)
    ref.eval()

    root, _ = release_set
    folder = tmp_path / "set"
    shutil.copytree(root, folder)
    torch.save({to_release[k]: v for k, v in state.items()}, folder / VAE_FILE)
    models = load_models(CheckpointPaths.from_dir(folder))
    assert (models.vae.cfg.dim, models.dit.cfg.dim) == (96, 64)

    latents = torch.randn(1, 16, 2, 2, 2, generator=gen)
    mean, std = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = ref.decode(latents * std + mean).sample
        got = models.vae.decode(latents)
    assert got.shape == expected.shape == (1, 3, 5, 16, 16)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
