"""Where a build's models come from and the shape it serves: the flags `tm-export onnx`, `build` and `calibrate` share.

One `ExportSource` travels from the command line (or a library call) down to
the one place that loads the models and checks the shape (`load`), so the
plain export, the fp8 export, the calibration and the TensorRT build read
the same eleven settings the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..build_format import GRAPH_NAMES
from ..dtypes import PRECISION_DTYPES
from ..errors import UsageError
from .shapes import ExportShape

# ----------------------------------------------------------------------------
# Random-weight model sets (presets without checkpoints, for sizing exports)
# ----------------------------------------------------------------------------


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim <= 1 and ("norm" in name or name.endswith("gamma")):
            p.fill_(1.0)
        elif p.ndim <= 1:
            p.zero_()
        else:
            fan_in = max(1, p[0].numel())
            # fill in slices: no fp32 temporary of a whole bf16 matrix
            for i in range(0, p.shape[0], 1024):
                blk = p[i : i + 1024]
                blk.copy_(torch.randn(blk.shape, generator=g) * (fan_in**-0.5))


def random_model_set(
    preset, dtype: torch.dtype, t5_dtype: torch.dtype, seed: int = 0, graphs: Iterable[str] | None = None
):
    """The preset's models with seeded random weights, built on the meta
    device and materialised directly in the target dtype (a wan-1.3b/umT5-XXL
    set never exists in fp32 unless asked). Only the models `graphs` need are
    built (the others are None)."""
    from ..models.checkpoints import ModelSet
    from ..models.dit import WanDiT
    from ..models.t5 import UMT5Encoder
    from ..models.vae import WanVAE

    wanted = set(graphs) if graphs is not None else set(GRAPH_NAMES)
    dit = t5 = vae = None
    if "dit" in wanted:
        with torch.device("meta"):
            dit = WanDiT(preset.dit)
        dit = dit.to(dtype=dtype).to_empty(device="cpu")
        _randomise(dit, seed)
        dit.eval()
    if "t5" in wanted:
        with torch.device("meta"):
            t5 = UMT5Encoder(preset.t5)
        t5 = t5.to(dtype=t5_dtype).to_empty(device="cpu")
        _randomise(t5, seed + 1)
        t5.eval()
    if wanted & {"vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder"}:
        vae = WanVAE(preset.vae).to(dtype).eval()  # small; its buffers (latent statistics) need real values
    return ModelSet(preset=preset, dit=dit, vae=vae, t5=t5, tokenizer=None)


def load_models_for_export(
    *,
    preset: str | None,
    checkpoints: Path | None,
    config: Path | None,
    precision: str,
    t5_precision: str,
    random_weights: bool = False,
    graphs: Iterable[str] | None = None,
):
    """The ModelSet an export reads: checkpoints or the release config, random weights, or a preset's own (toy, tiny)."""
    from ..errors import CheckpointError
    from ..models.checkpoints import CheckpointPaths, load_models
    from ..models.presets import DEFAULT_PRESET, get_preset
    from ..models.sources import load_model_set, release_config_has_models

    dtype = PRECISION_DTYPES[precision]
    t5_dtype = PRECISION_DTYPES[t5_precision]
    if random_weights:
        if checkpoints or release_config_has_models(config):
            raise UsageError(
                "--random-weights builds the preset's models from a seed; do not give --checkpoints or a --config with model_configs"
            )
        return random_model_set(get_preset(preset or DEFAULT_PRESET), dtype, t5_dtype, graphs=graphs)
    preset_obj = get_preset(preset) if preset else None
    if checkpoints or release_config_has_models(config):
        paths = CheckpointPaths.from_dir(checkpoints) if checkpoints else CheckpointPaths.from_release_config(config)
        # the release's DiT and umT5 files are bf16: load straight into the
        # build's dtypes, never an fp32 copy of a 14B model.
        return load_models(paths, preset_obj, dtype, t5_dtype=t5_dtype)
    if preset_obj is not None and not preset_obj.builtin_weights and preset_obj.packaged_weights is None:
        raise CheckpointError(
            f"--preset {preset_obj.name}: has no built-in weights; give --checkpoints DIR or --config inference_configs.json, "
            "or --random-weights to export random weights of that size"
        )
    # the preset's own weights (toy: shipped, tiny: built): small, loaded in fp32 and cast per graph
    return load_model_set(preset, None, None, torch.float32)


def parse_graph_names(graphs: Iterable[str] | None) -> tuple[str, ...] | None:
    """--graphs as known graph names (None = all)."""
    if graphs is None:
        return None
    names = tuple(g.strip() for g in graphs if g.strip())
    bad = [g for g in names if g not in GRAPH_NAMES]
    if bad or not names:
        raise UsageError(f"--graphs: unknown {', '.join(bad) or 'empty list'}; accepted: {', '.join(GRAPH_NAMES)}")
    return names


@dataclass(frozen=True)
class ExportSource:
    """The models (preset, checkpoints, release config or random weights) and the shape of one build.

    height, width: pixels; num_frames: stage 0's frames; intervals: the stages'
    frame intervals (each None = the preset's default). graphs: a subset of
    GRAPH_NAMES (None = all). t5_precision: None = the export precision's
    default (`export.t5.T5_PRECISION_FOR`). tile: the VAE graphs at the
    release's tile shape.
    """

    preset: str | None = None
    checkpoints: Path | None = None  # a folder in the release's layout
    config: Path | None = None  # the release's inference_configs.json
    random_weights: bool = False
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    intervals: tuple[int, ...] | None = None
    opset: int = 23
    t5_precision: str | None = None
    graphs: tuple[str, ...] | None = None
    tile: bool = False

    def __post_init__(self):
        # normalised once here, so every caller sees Paths, a tuple and checked graph names
        for name in ("checkpoints", "config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.intervals is not None:
            object.__setattr__(self, "intervals", tuple(int(i) for i in self.intervals))
        object.__setattr__(self, "graphs", parse_graph_names(self.graphs))

    def replace(self, **changes) -> ExportSource:
        return dataclasses.replace(self, **changes)

    def t5_precision_for(self, precision: str) -> str:
        from .t5 import T5_PRECISION_FOR

        return self.t5_precision or T5_PRECISION_FOR[precision]

    def graph_options(self, precision: str) -> dict:
        """The keywords `export_onnx` takes from the source: opset, umT5 precision, graph subset."""
        return {"opset": self.opset, "t5_precision": self.t5_precision_for(precision), "graphs": self.graphs}

    def load(self, precision: str, t5_precision: str | None = None):
        """(ModelSet, ExportShape): the models in `precision` (umT5 in `t5_precision`), the shape checked.

        UsageError names the bad flag (a shape the planner refuses, --random-weights
        with checkpoints); CheckpointError the bad file or key.
        """
        models = load_models_for_export(
            preset=self.preset,
            checkpoints=self.checkpoints,
            config=self.config,
            precision=precision,
            t5_precision=t5_precision or self.t5_precision_for(precision),
            random_weights=self.random_weights,
            graphs=self.graphs,
        )
        return models, self.shape_for(models.preset)

    def shape_for(self, preset) -> ExportShape:
        """This source's shape, the preset's defaults filling what was not given; UsageError if the planner refuses it."""
        shape = ExportShape.from_preset(preset, self.height, self.width, self.num_frames, self.intervals)
        try:
            shape.validate()
        except ValueError as err:
            raise UsageError(str(err)) from None
        return shape
