"""Loading release-layout checkpoints: clear errors for every way a file can be wrong."""
import json
import subprocess
import sys

import pytest
import torch

from tempomaster.models.checkpoints import (
    CheckpointError, CheckpointPaths, infer_dit_config, load_dit, load_models, read_state_dict,
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
