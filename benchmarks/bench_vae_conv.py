"""The VAE's 3D convolutions on this CPU: which path runs them fastest.

    python benchmarks/bench_vae_conv.py [--height 32 --width 32] [--batch 1]
        [--threads 2] [--repeats 5] [--seed 0] [--out results.json]

Every CausalConv3d call of one encode (1 + 4 frames) and one decode (2
latent frames) of the full-size Wan VAE (dim 96, seeded random weights) at
the given size is recorded (input shape, kernel, stride, padding); each
distinct call is then timed on fresh random inputs with every path:

    native         F.conv3d as torch dispatches it today (at small sizes its
                   heuristic picks slow_conv3d_forward, the im2col path)
    channels_last  F.conv3d on channels_last_3d input and weight
    mkldnn         torch.mkldnn_convolution, oneDNN forced whatever the size
                   (the weight reordered on every call)
    onednn_packed  oneDNN with the weight packed once (what the torch backend
                   runs: CausalConv3d after WanVAE.use_onednn())
    taps2d         the exact (1+2)D rewrite: each output frame is a 2D conv
                   over the kernel's input frames stacked as channels
                   (weight [O, C*kt, kh, kw]), run by oneDNN's 2D conv
    onnxruntime    the same Conv as a one-node ONNX graph in onnxruntime
    onnxruntime_taps2d  taps2d exported to ONNX (slices, stack, transposes and a
                   2D Conv, as it would sit in the channels-first VAE graph), in onnxruntime

The paths are interleaved call by call (round-robin over `--repeats`
rounds) so that a busy machine slows them alike; a path's time per call is
the median, its total the sum over the calls weighted by how often the VAE
makes each. Each path's largest deviation from native is recorded too
(float32; the rewrite sums in another order). Results as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="chunks per VAE call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paths", default="native,channels_last,mkldnn,onednn_packed,taps2d,onnxruntime,onnxruntime_taps2d")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def record_conv_calls(vae, batch: int, height: int, width: int) -> Counter:
    """(input shape, kernel, stride, padding, out channels) -> calls, over one encode and one decode."""
    from tempomaster.models.vae import CausalConv3d

    calls: Counter = Counter()
    original = CausalConv3d._conv_forward

    def recording(self, x, weight, bias):
        calls[
            (tuple(x.shape), tuple(self.kernel_size), tuple(self.stride), tuple(self.padding), self.out_channels)
        ] += 1
        return original(self, x, weight, bias)

    CausalConv3d._conv_forward = recording
    try:
        with torch.inference_mode():
            video = torch.rand(batch, 3, 5, height, width) * 2 - 1
            vae.encode(video)
            vae.decode(torch.randn(batch, vae.z_dim, 2, height // 8, width // 8))
    finally:
        del CausalConv3d._conv_forward  # back to nn.Conv3d's
    return calls


def onnx_conv_session(weight: torch.Tensor, bias: torch.Tensor, stride, padding, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    pads = [0, padding[1], padding[2]] * 2
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], strides=list(stride), pads=pads, kernel_shape=list(weight.shape[2:])
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


class _Taps2d(torch.nn.Module):
    def __init__(self, weight, bias, stride, padding):
        super().__init__()
        self.weight, self.bias, self.stride, self.padding = weight, bias, stride, padding

    def forward(self, x):
        return conv3d_taps2d(x, self.weight, self.bias, self.stride, self.padding)


def onnx_taps2d_session(weight, bias, stride, padding, x: torch.Tensor, threads: int):
    """The taps2d rewrite exported as it would sit in a channels-first graph (its slices,
    stack and transposes included), run by onnxruntime."""
    import io
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Taps2d(weight, bias, stride, padding), (x,), buf, dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def packed_conv(weight, bias, stride, padding):
    """The torch backend's path: a CausalConv3d with oneDNN on, its weight packed on the first call."""
    from tempomaster.models.vae import CausalConv3d

    conv = CausalConv3d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride, (0, padding[1], padding[2]))
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    conv.onednn = True
    return lambda x: conv(x)


def conv_paths(weight, bias, stride, padding, names, threads, x):
    """name -> callable(x) computing the same convolution (padding only in H and W, as CausalConv3d)."""

    pad = (0, padding[1], padding[2])
    cl_weight = weight.contiguous(memory_format=torch.channels_last_3d)
    paths = {
        "native": lambda x: F.conv3d(x, weight, bias, stride, pad),
        "channels_last": lambda x: F.conv3d(
            x.contiguous(memory_format=torch.channels_last_3d), cl_weight, bias, stride, pad
        ),
        "mkldnn": lambda x: torch.mkldnn_convolution(x, weight, bias, pad, stride, (1, 1, 1), 1),
        "onednn_packed": packed_conv(weight, bias, stride, pad),
        "taps2d": lambda x: conv3d_taps2d(x, weight, bias, stride, pad),
    }
    if "onnxruntime" in names:
        paths["onnxruntime"] = onnx_conv_session(weight, bias, stride, pad, threads)
    if "onnxruntime_taps2d" in names:
        paths["onnxruntime_taps2d"] = onnx_taps2d_session(weight, bias, stride, pad, x, threads)
    return {n: paths[n] for n in names}


def conv3d_taps2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """F.conv3d(x, weight, bias, stride, padding) with no time padding, as 2D convolutions.

    Exact rewrite (only the summation order differs): output frame t sums the
    kernel's kt input frames, so those frames, stacked as channels, go through
    one 2D conv with the weight's time taps stacked the same way; every output
    frame of every batch item is one item of that 2D conv's batch.
    """
    if padding[0] != 0:
        raise ValueError(f"conv3d_taps2d pads in H and W only, got padding {tuple(padding)}")
    b, c, t, h, w = x.shape
    out_ch, _, kt, kh, kw = weight.shape
    st = stride[0]
    t_out = (t - kt) // st + 1
    if kt == 1 and st == 1:
        frames = x.transpose(1, 2).reshape(b * t_out, c, h, w)
        weight2d = weight[:, :, 0]
    else:
        # [B, T_out, kt, C, H, W]: the kt input frames of each output frame
        taps = torch.stack([x[:, :, j : j + st * (t_out - 1) + 1 : st] for j in range(kt)], dim=1)
        frames = taps.permute(0, 3, 1, 2, 4, 5).reshape(b * t_out, kt * c, h, w)
        weight2d = weight.transpose(1, 2).reshape(out_ch, kt * c, kh, kw)
    y = F.conv2d(frames, weight2d, bias, stride[1:], padding[1:])
    return y.reshape(b, t_out, out_ch, *y.shape[-2:]).transpose(1, 2)


def bench(args) -> dict:
    from tempomaster.models.vae import WanVAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = WanVAE().eval()
    names = args.paths.split(",")
    calls = record_conv_calls(vae, args.batch, args.height, args.width)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    with torch.inference_mode():
        for (shape, kernel, stride, padding, out_ch), count in sorted(calls.items(), key=lambda kv: -kv[1]):
            weight = torch.randn(out_ch, shape[1], *kernel, generator=gen) * 0.05
            bias = torch.randn(out_ch, generator=gen) * 0.05
            x = torch.rand(shape, generator=gen) * 2 - 1
            paths = conv_paths(weight, bias, stride, padding, names, args.threads, x)
            want = paths["native"](x)
            deviation = {n: float((fn(x) - want).abs().max()) for n, fn in paths.items()}
            times = {n: [] for n in paths}
            for _ in range(args.repeats):
                for n, fn in paths.items():
                    start = time.perf_counter()
                    fn(x)
                    times[n].append(time.perf_counter() - start)
            rows.append(
                {
                    "input": list(shape),
                    "kernel": list(kernel),
                    "stride": list(stride),
                    "out_channels": out_ch,
                    "calls": count,
                    "median_ms": {n: round(1e3 * statistics.median(t), 3) for n, t in times.items()},
                    "max_abs_deviation": deviation,
                }
            )
    totals = {n: round(sum(r["calls"] * r["median_ms"][n] for r in rows), 1) for n in names}
    return {
        "what": "CausalConv3d calls of one encode (5 frames) and one decode (2 latent frames), full-size Wan VAE",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "total_ms": totals,
        "speedup_vs_native": {n: round(totals["native"] / totals[n], 2) for n in names},
        "calls": rows,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = bench(args)
    out = args.out or RESULTS_DIR / f"vae-conv-{args.height}x{args.width}-b{args.batch}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    for n, ms in result["total_ms"].items():
        print(f"{n:14s} {ms:9.1f} ms  ({result['speedup_vs_native'][n]:.2f}x)")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
