"""Nothing the package reads is unpickled as code: training state is safetensors + JSON, and every torch.load is tensors-only."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tempomaster.errors import UsageError
from tempomaster.toy.state_files import load_state, save_state

PACKAGE = Path(__file__).resolve().parents[1] / "tempomaster"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_load_in_the_package_can_unpickle_code():
    """Every torch.load passes weights_only=True (explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides only a
    default); nothing passes weights_only=False or allow_pickle=True, nor calls pickle's loaders."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parent)
        if "weights_only=False" in text.replace(" ", ""):
            offences.append(f"{where}: weights_only=False")
        for call in _calls(ast.parse(text)):
            name = _name(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            if name == "torch.load" or name.endswith("serialization.load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offences.append(f"{where}:{call.lineno}: {name} without weights_only=True")
            if isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is True:
                offences.append(f"{where}:{call.lineno}: allow_pickle=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads"):
                offences.append(f"{where}:{call.lineno}: {name}")
    assert not offences, offences
    # the scan sees the package's loads (it is not vacuous)
    assert "weights_only=True" in (PACKAGE / "models" / "checkpoints.py").read_text()


def _trained(seed: int):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=g)).square().mean().backward()
        opt.step()
    return model, opt, g


def test_a_training_state_round_trips_exactly_and_resumes(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    model, opt, g = _trained(seed)
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "step": 3,
        "folded": True,
        "log": [{"step": i, "loss": float(torch.rand(1, generator=g)), "parts": (1, "x", None)} for i in range(3)],
        "extras": {
            "bf16": torch.randn(2, 3, generator=g).bfloat16(),
            "mask": torch.rand(4, generator=g) > 0.5,
            "scalar": torch.tensor(2.5),
            "tied": [model[0].weight, model[0].weight],
            "odd": {7: "int key", "__tensor__": "a reserved name as a plain key"},
            "nan": math.nan,
        },
    }
    path = tmp_path / "phase.safetensors"
    save_state(state, path)
    assert [p.name for p in tmp_path.iterdir()] == ["phase.safetensors"]  # no temporary left
    back = load_state(path)
    assert back["step"] == 3 and back["folded"] is True and back["log"] == state["log"]
    assert back["extras"]["odd"] == {7: "int key", "__tensor__": "a reserved name as a plain key"}
    assert math.isnan(back["extras"]["nan"])
    for k in ("bf16", "mask", "scalar"):
        a, b = state["extras"][k], back["extras"][k]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]

    # resuming from the file takes the same next step as the run that never stopped
    resumed_model, _, _ = _trained(seed + 1)
    resumed_model.load_state_dict(back["model"])
    resumed = torch.optim.AdamW(resumed_model.parameters(), lr=3e-3, weight_decay=0.01)
    resumed.load_state_dict(back["opt"])
    x = torch.randn(4, 5, generator=g)
    for m, o in ((model, opt), (resumed_model, resumed)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_file_that_is_not_our_state_is_one_line(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "dit.safetensors"
    save_file({"w": torch.randn(3)}, str(foreign), metadata={"format": "someone-else"})
    with pytest.raises(UsageError, match="dit.safetensors") as info:
        load_state(foreign)
    assert "\n" not in str(info.value)
    # ours, but cut short (a disk that filled up): refused, naming the file
    save_state({"w": torch.randn(300)}, tmp_path / "vae.safetensors")
    data = (tmp_path / "vae.safetensors").read_bytes()
    (tmp_path / "vae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="vae.safetensors"):
        load_state(tmp_path / "vae.safetensors")
    # ours, with a state that names a tensor the file does not hold
    save_file(
        {"t0": torch.randn(2)},
        str(tmp_path / "edited.safetensors"),
        metadata={
            "format": "tempomaster-training-state",
            "version": "1",
            "state": json.dumps({"m": {"__tensor__": "t9"}}),
        },
    )
    with pytest.raises(UsageError, match="edited.safetensors"):
        load_state(tmp_path / "edited.safetensors")


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_pickle_in_a_work_folder_does_not_run(tmp_path):
    """tm-export train-toy --work DIR: an earlier version's vae.pt is read tensors-only, so a crafted one is
    refused in one line and its code never runs."""
    work, marker = tmp_path / "work", tmp_path / "ran"
    work.mkdir()
    torch.save({"model": _RunsCode(f"touch {marker}"), "opt": {}, "log": [], "step": 0}, work / "vae.pt")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "tm-export"),
            "train-toy",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--no-compile",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not marker.exists(), "the pickle's code ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(work / "vae.pt") in err, err
    assert not (tmp_path / "o").exists()


def test_every_state_the_trainer_reads_goes_through_the_safe_readers(tmp_path):
    """The task shards and the loss plot read states too: a crafted shard is refused, and a legitimate
    earlier-version shard (tensors only) still reads."""
    from tempomaster.toy import phases

    marker = tmp_path / "ran"
    torch.save({"x0": _RunsCode(f"touch {marker}")}, tmp_path / "tasks-00000.pt")
    with pytest.raises(UsageError, match="tasks-00000.pt"):
        phases.load_phase_state(phases.state_file(tmp_path, "tasks-00000"))
    assert not marker.exists()
    shard = {"x0": torch.randn(2, 16, 3, 4, 6).half(), "stage": torch.tensor([0, 1])}
    torch.save(shard, tmp_path / "tasks-00100.pt")
    back = phases.load_phase_state(phases.state_file(tmp_path, "tasks-00100"))
    assert back.keys() == shard.keys() and all(torch.equal(back[k], shard[k]) for k in shard)
