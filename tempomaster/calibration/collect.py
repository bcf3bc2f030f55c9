"""Amax collection on the real next-frame-rate trajectory.

`calibrate(...)` runs whole generations with the torch backend at the
build's shape, one per calibration prompt, and records for every block
Linear of the DiT the absolute maximum of its input over every DiT call of
every stage and step (cond and uncond halves are one batch, so both count),
and for every self- and cross-attention the absolute maxima of its q, k and
v (after the norms and RoPE: what the attention itself reads) and of q and
k transformed as FP8 attention quantizes them (`qk_transform`).
The maxima are kept per stage too, which is what the quality report needs to
compare whole-trajectory scales with stage-0-only scales without a second
run. Weights' amax is recorded per tensor (in amax.json) and per output
channel (in weight_amax.safetensors).

    BUILD/calibration/amax.json               prompts, settings, seed, shape, DiT hash, per-layer amax
    BUILD/calibration/weight_amax.safetensors per-output-channel weight amax, one [out] tensor per layer
    BUILD/calibration/report.json             the quality report (calibration.report)
    BUILD/calibration/progress.json           while it runs: the amax so far, after every finished video

The running maxima are written (atomically) after every video: a calibration
that was stopped continues, when run again with the same arguments, after
the last video it finished (the maxima are order-free, so the result is the
same as an uninterrupted run's); with other arguments it starts over.

A calibration names the preset, the shape and a sha256 of the DiT's weights
(their bf16 bytes): an export for another preset, shape or weights refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_write import write_bytes
from ..build_format import (
    CALIBRATION_DIR,
    CALIBRATION_FILE,
    CALIBRATION_FORMAT,
    CALIBRATION_PROGRESS_FILE,
    CALIBRATION_PROGRESS_FORMAT,
)
from ..errors import UsageError
from ..interrupts import raise_if_interrupted
from ..json_files import read_json_object
from .fp8 import ATTENTION_AMAX, ATTENTION_KINDS, BLOCK_LINEARS, attention_modules, quantizable_layers
from .prompts import CALIB_SETS, DEFAULT_CALIB_SET, CalibrationPrompt, builtin_prompts, read_prompt_file
from .qk_transform import hadamard_pair, transform_qk
from .trajectory import make_request

# the names a build folder knows its calibration by (build_format: export reads them too)
FORMAT = CALIBRATION_FORMAT
FORMAT_VERSION = 1
AMAX_FILE = CALIBRATION_FILE
WEIGHT_AMAX_FILE = "weight_amax.safetensors"
REPORT_FILE = "report.json"
PROGRESS_FILE = CALIBRATION_PROGRESS_FILE
PROGRESS_FORMAT = CALIBRATION_PROGRESS_FORMAT


# ----------------------------------------------------------------------------
# Hashes and small helpers
# ----------------------------------------------------------------------------


@torch.no_grad()
def dit_weights_sha256(dit: torch.nn.Module) -> str:
    """sha256 of the DiT's parameters as bf16 bytes (names, shapes, values).

    bf16 because the release's checkpoints are bf16: the same weights loaded
    as bf16 or fp32 hash the same.
    """
    h = hashlib.sha256()
    for name, p in sorted(dit.state_dict().items()):
        t = p.detach()
        if t.is_floating_point() and t.dtype != torch.bfloat16:
            t = t.to(torch.bfloat16)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shape_key(shape) -> dict:
    return {
        "height": int(shape.height),
        "width": int(shape.width),
        "num_frames": int(shape.num_frames),
        "intervals": [int(i) for i in shape.intervals],
    }


def _describe_shape(d: Mapping) -> str:
    return f"{d['height']}x{d['width']}, {d['num_frames']} frames, intervals {','.join(map(str, d['intervals']))}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)


def _file_sha256(path: Path) -> str:
    from ..build_format import sha256_file

    return sha256_file(path)


# ----------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------


@dataclass
class Calibration:
    """amax.json in memory (plus where it came from)."""

    data: dict
    path: Path | None = None

    @property
    def layers(self) -> dict:
        return self.data["layers"]

    def input_amax(self, stages: Sequence[int] | None = None) -> dict[str, float]:
        """Per-layer input amax over all stages, or over the given stages only."""
        if stages is None:
            return {n: float(r["input_amax"]) for n, r in self.layers.items()}
        return {n: max(float(r["input_amax_per_stage"][s]) for s in stages) for n, r in self.layers.items()}

    def layer_table(self, stages: Sequence[int] | None = None) -> dict[str, dict]:
        """name -> {"input_amax", "weight_amax"}: what `fp8.quantize_dit` takes."""
        amax = self.input_amax(stages)
        return {n: {"input_amax": amax[n], "weight_amax": float(r["weight_amax"])} for n, r in self.layers.items()}

    @property
    def has_attention(self) -> bool:
        return isinstance(self.data.get("attention"), dict)

    def attention_table(self, stages: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
        """ "blocks.N.<kind>" -> {"q", "k", "v", "q_rotated", "k_rotated"} amax over all stages (or the given ones).

        `fp8.quantize_dit`'s `attention`.
        """
        if not self.has_attention:
            raise UsageError(
                f'{self.path or "calibration"}: no "attention" section (made before FP8 attention); '
                "run tm-export calibrate again, or give --fp8-attention off"
            )
        out = {}
        for name, rec in self.data["attention"].items():
            if any(f"{n}_amax" not in rec for n in ATTENTION_AMAX):
                raise UsageError(
                    f"{self.path or 'calibration'}: no amax of the rotated q and k for {name} (made before they were "
                    "recorded); run tm-export calibrate again, or give --fp8-attention off"
                )
            if stages is None:
                out[name] = {n: float(rec[f"{n}_amax"]) for n in ATTENTION_AMAX}
            else:
                out[name] = {n: max(float(rec[f"{n}_amax_per_stage"][s]) for s in stages) for n in ATTENTION_AMAX}
        return out

    def per_channel(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if self.path is None:
            raise UsageError("this calibration was not loaded from a directory; per-channel weight amax unavailable")
        path = self.path.parent / WEIGHT_AMAX_FILE
        if not path.is_file():
            raise UsageError(f"{path}: missing (it holds the per-channel weight amax); run tm-export calibrate again")
        want = self.data["weight_amax_file"]["sha256"]
        if _file_sha256(path) != want:
            raise UsageError(f"{path}: sha256 differs from the one {self.path} records; run tm-export calibrate again")
        return load_file(str(path))

    def check(self, *, preset: str | None, shape, dit_sha256: str | None, where: str | None = None) -> None:
        """Refuse (one line) a calibration made for another preset, shape or DiT weights."""
        where = where or str(self.path or "calibration")
        d = self.data
        problems = []
        if preset is not None and d.get("preset") != preset:
            problems.append(f"preset {d.get('preset')!r} (this build: {preset!r})")
        if shape is not None and d.get("shape") != _shape_key(shape):
            problems.append(f"shape {_describe_shape(d['shape'])} (this build: {_describe_shape(_shape_key(shape))})")
        if dit_sha256 is not None and d.get("dit_sha256") != dit_sha256:
            problems.append(
                f"DiT weights sha256 {str(d.get('dit_sha256'))[:12]}... (this build's: {dit_sha256[:12]}...)"
            )
        if problems:
            raise UsageError(
                f"{where}: calibration made for {'; '.join(problems)}; run tm-export calibrate for this build"
            )


def load_calibration(path: str | os.PathLike) -> Calibration:
    """BUILD, BUILD/calibration or BUILD/calibration/amax.json -> Calibration (UsageError if absent or bad)."""
    path = Path(path)
    if path.is_dir():
        path = path / AMAX_FILE if (path / AMAX_FILE).is_file() else path / CALIBRATION_DIR / AMAX_FILE
    if not path.is_file():
        raise UsageError(f"{path}: no calibration; run tm-export calibrate --out BUILD first")
    data = read_json_object(path, UsageError, "calibration")
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file")
    return Calibration(data, path)


# ----------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------


def _abs_max(x: torch.Tensor, where: str) -> float:
    value = float(x.detach().abs().amax()) if x.numel() else 0.0
    if value != value or value == float("inf"):
        raise FloatingPointError(f"calibration: non-finite input to {where}")
    return value


class AmaxRecorder:
    """Forward pre-hooks on the DiT's block Linears and attentions: running input abs-max per tensor and stage.

    `amax` holds one row per Linear ("blocks.N.ffn.0"), `attention_amax` one
    per attention input ("blocks.N.self_attn" -> "q" | "k" | "v", and
    "q_rotated" | "k_rotated": q and k after `qk_transform.transform_qk`). A DiT
    call's abs-max is held until the generation's step callback
    (`on_step_end`) says which stage that call belonged to.
    """

    def __init__(self, dit: torch.nn.Module, num_stages: int):
        self.names = quantizable_layers(len(dit.blocks))
        self.attention_names = attention_modules(len(dit.blocks))
        modules = dict(dit.named_modules())
        self.amax = {n: [0.0] * num_stages for n in self.names}
        self.attention_amax = {n: {i: [0.0] * num_stages for i in ATTENTION_AMAX} for n in self.attention_names}
        self._pending: dict[tuple[str, str | None], float] = {}
        self._hadamard = hadamard_pair(dit.cfg.head_dim)
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]
        self._handles += [
            modules[f"{n}.attn"].register_forward_pre_hook(self._attention_hook(n)) for n in self.attention_names
        ]

    def _hold(self, key: tuple[str, str | None], value: float) -> None:
        self._pending[key] = max(self._pending.get(key, 0.0), value)

    def _hook(self, name: str):
        def hook(_module, args):
            self._hold((name, None), _abs_max(args[0], name))

        return hook

    def _attention_hook(self, name: str):
        def hook(_module, args):
            q, k, v = args[:3]  # [B, L, heads, head_dim]
            h_q, h_k = (h.to(q.device, q.dtype) for h in self._hadamard)
            q_rot, k_rot = transform_qk(q, k, h_q, h_k, token_dim=1)
            for tensor, which in zip((q, k, v, q_rot, k_rot), ATTENTION_AMAX):
                self._hold((name, which), _abs_max(tensor, f"{name} ({which})"))

        return hook

    def state(self) -> dict:
        """The maxima so far (JSON-ready): what a resumed calibration starts from."""
        return {"layers": self.amax, "attention": self.attention_amax}

    def restore(self, state: Mapping) -> None:
        """Continue from `state()` of an earlier run over the same DiT and stages."""
        layers, attention = state["layers"], state["attention"]
        if sorted(layers) != sorted(self.amax) or sorted(attention) != sorted(self.attention_amax):
            raise ValueError("the saved maxima name other layers than this DiT's")
        self.amax = {n: [float(v) for v in layers[n]] for n in self.names}
        self.attention_amax = {
            n: {i: [float(v) for v in attention[n][i]] for i in ATTENTION_AMAX} for n in self.attention_names
        }

    def on_step_end(self, event) -> None:
        """Credit the step's DiT call to its stage (a `generate` step callback)."""
        for (name, which), value in self._pending.items():
            row = self.amax[name] if which is None else self.attention_amax[name][which]
            row[event.stage] = max(row[event.stage], value)
        self._pending.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def resolve_steps(
    calib_steps: int | Sequence[int] | None, preset, num_stages: int, fraction: float = 1.0
) -> tuple[int, ...]:
    """Steps per stage for calibration: `fraction` of the preset's by default; an int applies to every stage."""
    from .cost import scaled_steps

    default = scaled_steps(preset.defaults.steps_per_stage[:num_stages], fraction)
    if calib_steps is None:
        return default
    steps = (int(calib_steps),) * num_stages if isinstance(calib_steps, int) else tuple(int(s) for s in calib_steps)
    if len(steps) != num_stages or any(s < 1 for s in steps):
        raise UsageError(
            f"--calib-steps: need one positive step count or {num_stages} (one per stage), got {calib_steps}"
        )
    return steps


def resolve_calib_set(calib_set: str | None):
    name = DEFAULT_CALIB_SET if calib_set is None else calib_set
    if name not in CALIB_SETS:
        raise UsageError(f"--calib-set: {name!r} is not one of {', '.join(CALIB_SETS)}")
    return name, CALIB_SETS[name]


def resolve_prompts(prompts, count: int | None = None) -> tuple[list[CalibrationPrompt], dict]:
    """None (the first `count` built-in prompts, all if None), a prompt file path, or a list of prompts / strings."""
    if prompts is None:
        return builtin_prompts(count), {"source": "builtin", **({"count": count} if count is not None else {})}
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        return read_prompt_file(path), {"source": str(path), "sha256": _file_sha256(path)}
    out = [p if isinstance(p, CalibrationPrompt) else CalibrationPrompt(str(p)) for p in prompts]
    if not out:
        raise UsageError("calibration prompts: the list is empty")
    return out, {"source": "list"}


@torch.no_grad()
def weight_amax(dit: torch.nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    modules = dict(dit.named_modules())
    per_tensor, per_channel = {}, {}
    for name in quantizable_layers(len(dit.blocks)):
        w = modules[name].weight.detach()
        rows = w.abs().amax(dim=1).float()
        per_channel[name] = rows.contiguous()
        per_tensor[name] = float(rows.max())
    return per_tensor, per_channel


def _progress_key(**arguments) -> str:
    """sha256 of what decides a calibration's result: a progress file made with another key is not resumed."""
    return hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()


def _read_progress(path: Path, key: str, total: int, say: Callable[[str], None]) -> dict | None:
    """The saved state to resume from, or None (and one line saying why when a file was there)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = data.get("format") == PROGRESS_FORMAT and isinstance(data.get("videos_done"), int)
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        say(f"calibration: {path} is unreadable; starting over")
        return None
    if data.get("key") != key:
        say(
            f"calibration: {path} was made with other arguments (prompts, steps, seed, shape, weights or dtype); "
            "starting over"
        )
        return None
    if not 0 < data["videos_done"] < total:
        return None
    say(f"calibration: resuming after video {data['videos_done']} of {total} ({path})")
    return data


def calibrate(
    models,
    shape,
    out_dir: str | os.PathLike,
    *,
    prompts=None,
    calib_steps: int | Sequence[int] | None = None,
    calib_set: str | None = None,
    seed: int = 0,
    preset_name: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    report: bool = True,
    report_prompts: int = 4,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Calibration:
    """Record per-layer amax on whole generations; write BUILD/calibration/ (and the quality report).

    models: a ModelSet (DiT, VAE, umT5, tokenizer). shape: the build's
    ExportShape. prompts: None for the built-in set (BUILTIN_PROMPTS), a
    prompt-file path, or a list. calib_steps: denoising steps per stage
    during calibration (fewer steps cover the same noise levels more
    coarsely). calib_set: "small" (default) or "full" (prompts.CALIB_SETS),
    the prompts and share of the preset's steps used where `prompts` /
    `calib_steps` are not given. seed: video i uses seed + i. dtype: the
    torch backend's dtype (default: the DiT's). Resumes from
    BUILD/calibration/progress.json when it was made with the same
    arguments. Returns the Calibration.
    """
    from tqdm.auto import tqdm

    from ..runtime.backends.torch import TorchBackend
    from ..runtime.pipeline import generate

    say = log or (lambda _m: None)
    shape.validate()
    preset = models.preset
    preset_name = preset_name or preset.name
    set_name, calib_spec = resolve_calib_set(calib_set)
    prompt_list, prompt_source = resolve_prompts(prompts, calib_spec.prompts)
    num_stages = len(shape.intervals)
    steps = resolve_steps(calib_steps, preset, num_stages, calib_spec.step_fraction)
    if models.tokenizer is None:
        raise UsageError("calibration runs whole generations and needs the tokenizer; give --checkpoints or --config")
    out_dir = Path(out_dir)
    cal_dir = out_dir / CALIBRATION_DIR

    dit_sha = dit_weights_sha256(models.dit)
    w_tensor, w_channel = weight_amax(models.dit)
    dtype = dtype or models.dit.dtype
    backend = TorchBackend(models, dtype=dtype, device=device)
    recorder = AmaxRecorder(backend.dit, num_stages)
    progress_path = cal_dir / PROGRESS_FILE
    key = _progress_key(
        preset=preset_name,
        shape=_shape_key(shape),
        dit_sha256=dit_sha,
        steps=list(steps),
        seed=seed,
        dtype=str(dtype),
        prompts=[p.as_dict() for p in prompt_list],
        prompt_source=prompt_source,
        layers=recorder.names,
        attention=recorder.attention_names,
        attention_amax=list(ATTENTION_AMAX),
    )
    from .cost import describe_projection

    say(describe_projection(preset, models.dit.cfg, shape, steps, len(prompt_list), set_name))
    saved = _read_progress(progress_path, key, len(prompt_list), say)
    done, calls, per_video = 0, 0, []
    if saved is not None:
        recorder.restore(saved["amax"])
        done, calls, per_video = saved["videos_done"], int(saved["dit_calls"]), list(saved["seconds_per_video"])
    t0 = time.perf_counter()
    try:
        bar = tqdm(
            total=len(prompt_list), initial=done, desc="calibrate", unit="video", disable=not progress, file=sys.stderr
        )
        for i in range(done, len(prompt_list)):
            raise_if_interrupted()
            v0 = time.perf_counter()
            request = make_request(prompt_list[i], shape, preset, steps, seed + i)
            result = generate(
                backend,
                models.tokenizer,
                request,
                progress=progress,
                keep_stages=False,
                on_step_end=recorder.on_step_end,
            )
            calls += result.dit_calls
            per_video.append(round(time.perf_counter() - v0, 3))
            state = {
                "format": PROGRESS_FORMAT,
                "format_version": 1,
                "key": key,
                "videos_done": i + 1,
                "videos": len(prompt_list),
                "dit_calls": calls,
                "seconds_per_video": per_video,
                "amax": recorder.state(),
            }
            _write_atomic(progress_path, (json.dumps(state) + "\n").encode())
            bar.update(1)
        bar.close()
    finally:
        recorder.remove()
    seconds = time.perf_counter() - t0

    layers = {}
    for name in recorder.names:
        per_stage = recorder.amax[name]
        layers[name] = {
            "input_amax": max(per_stage),
            "input_amax_per_stage": per_stage,
            "weight_amax": w_tensor[name],
        }
    attention = {}
    for name in recorder.attention_names:
        rec = {}
        for which, per_stage in recorder.attention_amax[name].items():
            rec[f"{which}_amax"] = max(per_stage)
            rec[f"{which}_amax_per_stage"] = per_stage
        attention[name] = rec
    from safetensors.torch import save

    weight_bytes = save(w_channel)
    _write_atomic(cal_dir / WEIGHT_AMAX_FILE, weight_bytes)
    d = preset.defaults
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "preset": preset_name,
        "shape": _shape_key(shape),
        "dit_sha256": dit_sha,
        "dit": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(models.dit.cfg).items()},
        "seed": seed,
        "settings": {
            "steps_per_stage": list(steps),
            "calib_steps": calib_steps if calib_steps is None or isinstance(calib_steps, int) else list(calib_steps),
            "calib_set": set_name,
            "preset_steps_per_stage": list(d.steps_per_stage[:num_stages]),
            "shift_per_stage": list(d.shift_per_stage[:num_stages]),
            "guidance_scale": d.guidance_scale,
            "use_apg": d.use_apg,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "statistic": "abs-max of the layer input over every DiT call (cond+uncond batch), every step, every stage",
        },
        "prompts": [p.as_dict() for p in prompt_list],
        "prompt_source": prompt_source,
        "dit_calls": calls,
        "seconds": round(seconds, 2),
        "seconds_per_video": per_video,
        "resumed_after_video": done,
        "quantized_linears": list(BLOCK_LINEARS),
        "weight_amax_file": {"file": WEIGHT_AMAX_FILE, "sha256": hashlib.sha256(weight_bytes).hexdigest()},
        "layers": layers,
        "attention_kinds": list(ATTENTION_KINDS),
        "attention": attention,
    }
    amax_path = cal_dir / AMAX_FILE
    _write_atomic(amax_path, (json.dumps(data, indent=1) + "\n").encode())
    progress_path.unlink(missing_ok=True)  # ours: written above, complete now
    calibration = Calibration(data, amax_path)
    say(
        f"calibration: {len(prompt_list)} videos, {calls} DiT calls, {seconds:.1f}s "
        f"({seconds / max(1, len(prompt_list) - done):.1f}s per video) -> {amax_path}"
    )
    if report:
        from .report import format_report, quality_report

        rep = quality_report(
            models,
            shape,
            calibration,
            backend=backend,
            prompts=report_prompts,
            exclude=[p.prompt for p in prompt_list],
            progress=progress,
        )
        _write_atomic(cal_dir / REPORT_FILE, (json.dumps(rep, indent=1) + "\n").encode())
        say(format_report(rep))
    return calibration
