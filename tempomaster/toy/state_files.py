"""The trainer's resumable state on disk as safetensors + JSON: nothing is ever unpickled.

A state is a nest of dicts, lists and tuples whose leaves are tensors or
JSON scalars (a phase's model and optimiser state dicts, its loss log, its
step; a task shard's tensors).  The tensors go in the safetensors body under
names ``t0``, ``t1``, ...; the nest itself is JSON in the file's metadata,
each tensor replaced by ``{"__tensor__": name}``.  Reading one parses JSON
and raw tensor bytes only, so a crafted file in a work folder cannot run
code, and every value comes back exactly (tensors bit for bit, floats via
their shortest repr, int dict keys and tuples as they were).

One file per state, written through ``atomic_write.staged_file``: a killed
run leaves the previous state or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic_write import staged_file
from ..errors import UsageError

SUFFIX = ".safetensors"
FORMAT = "tempomaster-training-state"
FORMAT_VERSION = "1"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_RESERVED = {_TENSOR, _TUPLE, _ITEMS}


def save_state(state, path: Path) -> None:
    """Write ``state`` to ``path`` (a ``.safetensors`` file) atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    nest = json.dumps(_encode(state, tensors), allow_nan=True)
    with staged_file(path, suffix=SUFFIX) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": FORMAT_VERSION, "state": nest})


def load_state(path: Path):
    """The state saved at ``path``; a file that is not one is a one-line UsageError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
                raise UsageError(
                    f"--work: {path} is not a training state of this version (no {FORMAT} v{FORMAT_VERSION} header)"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return _decode(json.loads(meta["state"]), tensors)
    except UsageError:
        raise
    except Exception as err:  # truncated file, bad header, JSON that is not ours
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"--work: cannot read the training state {path} ({type(err).__name__}: {first}); "
            "remove it to redo that part"
        ) from None


def _encode(value, tensors: dict):
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # an own, contiguous copy: safetensors refuses tensors that share storage (a state dict's tied weights)
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: name}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not _RESERVED & value.keys():
            return {k: _encode(v, tensors) for k, v in value.items()}
        # an optimiser's state is keyed by parameter index (int): kept as pairs
        return {_ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a training state holds only tensors, containers and JSON scalars, not {type(value).__name__}")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if value.keys() == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if value.keys() == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if value.keys() == {_ITEMS}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value
