"""Loading release-layout checkpoints: clear errors for every way a file can be wrong."""

import json

import pytest
import torch

from tempomaster.errors import UsageError
from tempomaster.models.checkpoints import (
    CheckpointError,
    CheckpointPaths,
    infer_dit_config,
    load_dit,
    load_models,
    read_state_dict,
)
from tempomaster.models.dit import WanDiT
from tempomaster.models.presets import DiTConfig, get_preset

SMALL = DiTConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=16)


@pytest.fixture()
def dit_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "wan_video_dit_bf16.bin"
    torch.save({k: v.to(torch.bfloat16) for k, v in WanDiT(SMALL).state_dict().items()}, path)
    return path


def test_roundtrip_reads_every_dimension(dit_file):
    state = read_state_dict(dit_file)
    cfg = infer_dit_config(state, num_heads=2)
    assert cfg == SMALL
    model = load_dit(dit_file, num_heads=2)
    assert torch.equal(model.blocks[1].ffn[2].weight, state["blocks.1.ffn.2.weight"].float())


def test_renamed_key_names_file_and_keys(dit_file, tmp_path):
    state = read_state_dict(dit_file)
    state["blocks.0.self_attn.query.weight"] = state.pop("blocks.0.self_attn.q.weight")
    bad = tmp_path / "renamed.bin"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        load_dit(bad, num_heads=2)
    msg = str(err.value)
    assert str(bad) in msg
    assert "missing keys: blocks.0.self_attn.q.weight" in msg
    assert "unexpected keys: blocks.0.self_attn.query.weight" in msg


def test_wrong_shape_names_key_and_both_shapes(dit_file, tmp_path):
    state = read_state_dict(dit_file)
    state["blocks.1.cross_attn.o.weight"] = torch.zeros(32, 31)
    bad = tmp_path / "shape.bin"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.cross_attn\.o\.weight: file \(32, 31\) vs model \(32, 32\)"):
        load_dit(bad, num_heads=2)


def test_truncated_file_is_an_error(dit_file, tmp_path):
    data = dit_file.read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(bad)


def test_truncated_safetensors_is_an_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=str(path)):
        read_state_dict(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.randn(2), "obj": object()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.bin")


def test_declared_config_disagreeing_names_both_values(dit_file):
    declared = {"dim": 5120, "num_heads": 2}
    with pytest.raises(CheckpointError, match=r"says DiT dim=5120 but the checkpoint has dim=32"):
        load_dit(dit_file, num_heads=2, declared=declared)


def test_tiny_set_on_disk_loads_and_equals_the_builtin(tiny_checkpoints, tiny_models):
    models = load_models(CheckpointPaths.from_dir(tiny_checkpoints))
    assert models.preset.name == "tiny"
    for name in ("dit", "vae", "t5"):
        ours, builtin = getattr(models, name).state_dict(), getattr(tiny_models, name).state_dict()
        assert ours.keys() == builtin.keys()
        for key in ours:
            assert torch.equal(ours[key], builtin[key]), (name, key)
    # the latent statistics are constants, rebuilt after a meta-device load
    assert torch.equal(models.vae.latents_std, tiny_models.vae.latents_std)
    assert not models.vae.latents_mean.is_meta and models.vae.latents_mean.abs().sum() > 0
    ids, mask = models.tokenizer(["a red ball"])
    assert ids.shape == (1, 512) and int(mask.sum()) > 1


def test_release_config_is_read_as_it_is(tiny_checkpoints):
    paths = CheckpointPaths.from_release_config(tiny_checkpoints / "inference_configs.json")
    assert paths.dit == tiny_checkpoints / "wan_video_dit_bf16.bin"
    assert paths.tokenizer == tiny_checkpoints / "encoders" / "google" / "umt5-xxl"
    models = load_models(paths)
    assert models.dit.cfg.num_heads == 2


def test_config_disagreeing_with_checkpoint_is_an_error(tiny_checkpoints, tmp_path):
    config = json.loads((tiny_checkpoints / "inference_configs.json").read_text())
    config["model_configs"]["wan_video_dit_config"]["num_layers"] = 40
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_layers=40 but the checkpoint has num_layers=2"):
        load_models(CheckpointPaths.from_release_config(path))


def test_named_preset_disagreeing_with_checkpoint_is_an_error(tiny_checkpoints):
    # a preset the user named is a claim about the files: the refusal names the flag
    with pytest.raises(UsageError, match=r"--preset wan-1.3b: the preset says DiT \w+="):
        load_models(CheckpointPaths.from_dir(tiny_checkpoints), get_preset("wan-1.3b"))


def test_preset_parameter_counts_on_meta():
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.vae import WanVAE

    counts = {}
    for name in ("tiny", "wan-1.3b", "tempomaster-14b"):
        preset = get_preset(name)
        with torch.device("meta"):
            counts[name] = [
                sum(p.numel() for p in m.parameters())
                for m in (WanDiT(preset.dit), WanVAE(preset.vae), UMT5Encoder(preset.t5))
            ]
    dit14, vae14, t5_14 = counts["tempomaster-14b"]
    assert 14.0e9 < dit14 < 14.5e9
    assert abs(vae14 - 126.9e6) < 0.1e6
    assert 5.6e9 < t5_14 < 5.8e9
    assert 1.2e9 < counts["wan-1.3b"][0] < 1.5e9
    assert sum(counts["tiny"]) < 2e6
