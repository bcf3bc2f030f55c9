"""The release's side of benchmarks/bench_cpu_speed.py: one generation by the public TempoMaster release's own pipeline.

Run as bench_cpu_speed.py's child (`--child release --release TREE`): TREE is
an unmodified work tree of the release (infer.py, pipelines/, wan_dit/,
scheduler.py). Its files are never changed; what this process changes at run
time, and why, is exactly this:

- `device="cpu"` and `torch_dtype=torch.float32` are passed to its loader,
  `SequentialPipeline.init_from_config` (its launcher passes `cuda:N` and
  bf16): the same dtype and device as our side, so the frames can be compared.
- `pipelines.sequential_ppl.WanTextEncoder` (the name its loader calls with
  no arguments, which builds the 5.7B-parameter umT5-XXL) is bound to the
  release's own class with the sizes of the text encoder file being loaded,
  read from that file's tensors: the benchmark's encoders are small.
- When `torchvision` cannot be imported (its PyPI wheel for this torch is
  built against CUDA libraries this machine does not have), a stand-in
  module is installed under that name before the release is imported (after
  the diffusers modules the release imports, which probe for torchvision, so
  they see the machine as it is). On the
  path run here the release uses one torchvision function, `center_crop` of
  a tensor, which the stand-in implements as torchvision documents it
  (offsets int(round((size - crop) / 2))); the other names it imports
  (`GaussianBlur`, `transforms as T`) are only imported, and the stand-in's
  GaussianBlur refuses to run.

The call itself is the one its launcher makes (infer.py's `pipe(...)`), with
these differences: `enable_apg` gets the benchmark's guidance setting (its
launcher passes `verbose` there, SPEC.md section 4), `seed` the benchmark's,
and the progress bar is replaced by a plain iteration. Nothing else is
patched: the timings come from wrappers that record the wall time around the
release's own methods (`vae.encode`, `vae.decode`, `prompter.encode_prompt`,
`scheduler.set_timesteps`, the DiT's forward via hooks) and pass every call
through unchanged; `tensor2video`'s argument is kept as the float frames.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import json
import sys
import time
import types
from pathlib import Path

# What the release's wan_dit/transformer_wan.py imports from diffusers (its only diffusers use on this path).
RELEASE_DIFFUSERS_MODULES = (
    "diffusers.configuration_utils",
    "diffusers.loaders.single_file_model",
    "diffusers.loaders.peft",
    "diffusers.models.attention",
    "diffusers.models.attention_processor",
    "diffusers.models.cache_utils",
    "diffusers.models.embeddings",
    "diffusers.models.modeling_outputs",
    "diffusers.models.modeling_utils",
    "diffusers.models.normalization",
    "diffusers.utils",
)


def center_crop(img, output_size):
    """torchvision's `center_crop` of a tensor, for crops inside the image: offsets int(round((size - crop) / 2))."""
    th, tw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = img.shape[-2:]
    if th > h or tw > w:
        raise NotImplementedError("torchvision stand-in: center_crop with padding is not on the benchmark's path")
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img[..., top : top + th, left : left + tw]


def install_torchvision_stand_in() -> bool:
    """Register a minimal `torchvision` when the real one cannot be imported; True when the stand-in is used."""
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:  # ModuleNotFoundError, or the CUDA-built wheel's operator registration failing
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    # diffusers and transformers probe for torchvision (importlib.util.find_spec) when their lazy modules load:
    # load the ones the release's wan_dit/transformer_wan.py imports now, so they see the machine as it is
    for name in RELEASE_DIFFUSERS_MODULES:
        importlib.import_module(name)

    class GaussianBlur:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError("torchvision stand-in: GaussianBlur is not on the benchmark's path")

    root, transforms, functional = (
        types.ModuleType(name)
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    )
    for module in (root, transforms, functional):
        # a spec, as every imported module has: libraries probe packages with importlib.util.find_spec
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None, is_package=module is not functional)
    functional.center_crop = center_crop
    transforms.functional = functional
    transforms.GaussianBlur = GaussianBlur
    root.transforms = transforms
    sys.modules.update(
        {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    )
    return True


class ReleaseProbe:
    """Wall time around the release pipeline's own methods; every call passes through unchanged."""

    def __init__(self, pipe):
        self.calls: list[dict] = []
        self.stage_starts: list[float] = []
        self.frames = None
        self._dit_start = 0.0
        pipe.vae.encode = self._timed("vae_encode", pipe.vae.encode)
        pipe.vae.decode = self._timed("vae_decode", pipe.vae.decode)
        pipe.prompter.encode_prompt = self._timed("encode_text", pipe.prompter.encode_prompt)
        set_timesteps = pipe.scheduler.set_timesteps

        def stage_mark(*args, **kwargs):
            self.stage_starts.append(time.perf_counter())
            return set_timesteps(*args, **kwargs)

        pipe.scheduler.set_timesteps = stage_mark
        tensor2video = pipe.tensor2video

        def keep_frames(frames):
            self.frames = frames.detach().float().clone()
            return tensor2video(frames)

        pipe.tensor2video = keep_frames
        pipe.dit.register_forward_pre_hook(self._dit_begin)
        pipe.dit.register_forward_hook(self._dit_end)

    def _stage(self) -> int:
        return max(len(self.stage_starts) - 1, 0)

    def _record(self, method: str, shape, start: float) -> None:
        self.calls.append(
            {
                "method": method,
                "stage": self._stage(),
                "shape": list(shape),
                "seconds": time.perf_counter() - start,
                "start": start,
            }
        )

    def _timed(self, method: str, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            first = args[0] if args else None
            shape = getattr(first, "shape", [len(first)] if isinstance(first, (list, tuple, str)) else [])
            self._record(method, shape, start)
            return out

        return call

    def _dit_begin(self, module, args):
        self._dit_start = time.perf_counter()

    def _dit_end(self, module, args, output):
        self._record("velocity", args[0].shape, self._dit_start)

    def stages(self, end: float) -> list[dict]:
        """Per stage: seconds (from its first VAE encode or schedule, whichever is first, to the next stage), VAE share."""
        marks = list(self.stage_starts)
        encodes0 = [c["start"] for c in self.calls if c["stage"] == 0 and c["method"] == "vae_encode"]
        marks[0] = min([marks[0], *encodes0])
        out = []
        for k, begin in enumerate(marks):
            finish = marks[k + 1] if k + 1 < len(marks) else end
            vae = sum(c["seconds"] for c in self.calls if c["stage"] == k and c["method"].startswith("vae"))
            seconds = finish - begin
            out.append(
                {
                    "stage": k,
                    "seconds": seconds,
                    "vae_seconds": vae,
                    "vae_share": vae / seconds,
                    "vae_encode_calls": sum(c["stage"] == k and c["method"] == "vae_encode" for c in self.calls),
                }
            )
        return out


def text_encoder_sizes(t5_file: Path) -> dict:
    """The release's WanTextEncoder arguments for the umT5 file at hand, read from its tensors."""
    from tempomaster.models.checkpoints import infer_t5_config, read_state_dict

    cfg = infer_t5_config(read_state_dict(t5_file), t5_file)
    return {
        "vocab": cfg.vocab_size,
        "dim": cfg.dim,
        "dim_attn": cfg.dim_attn,
        "dim_ffn": cfg.dim_ffn,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "num_buckets": cfg.num_buckets,
    }


def run_release_child(args, request: dict) -> dict:
    """One timed generation by the release (loading excluded); `request` holds the benchmark's settings."""
    import torch

    torch.set_num_threads(args.threads)
    release = Path(args.release).resolve()
    stand_in = install_torchvision_stand_in()
    sys.path.insert(0, str(release))
    from pipelines import sequential_ppl
    from wan_dit import WanTextEncoder

    config = json.loads((Path(args.release_checkpoints) / "inference_configs.json").read_text())
    model_config = config["model_configs"]
    sizes = text_encoder_sizes(Path(model_config["wan_video_text_encoder_path"]))
    sequential_ppl.WanTextEncoder = functools.partial(WanTextEncoder, **sizes)

    load_start = time.perf_counter()
    pipe = sequential_ppl.SequentialPipeline.init_from_config(
        model_config=model_config, device="cpu", torch_dtype=torch.float32
    )
    load_seconds = time.perf_counter() - load_start
    probe = ReleaseProbe(pipe)
    intervals, steps, shifts = request["frame_intervals"], request["steps_per_stage"], request["shift_per_stage"]
    start = time.perf_counter()
    pipe(
        prompt=request["prompt"],
        negative_prompt=request["negative_prompt"],
        ref_images={str(k): v for k, v in request["ref_images"].items()},
        height=request["height"],
        width=request["width"],
        num_frames=request["num_frames"],
        cfg_scale=request["guidance_scale"],
        seed=request["seed"],
        tiled=False,
        verbose=False,
        enable_apg=request["use_apg"],
        progress_bar_cmd=lambda iterable, desc=None: iterable,
        parrallel_config={
            "frame_intervals": list(intervals),
            "steps_per_stage": list(steps),
            "shift_per_stage": list(shifts),
        },
    )
    end = time.perf_counter()
    frames, stages = probe.frames, probe.stages(end)
    for c in probe.calls:
        c.pop("start")
    return {
        "source": str(release),
        "backend": "release",
        "torchvision_stand_in": stand_in,
        "text_encoder_sizes": sizes,
        "load_seconds": load_seconds,
        "seconds": end - start,
        "stages": stages,
        "calls": probe.calls,
        "frames_uint8_sum": int(((frames.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).sum()),
        "frames": frames.tolist(),
    }
