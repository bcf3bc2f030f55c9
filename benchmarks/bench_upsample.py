"""The VAE decoder's nearest 2x upsampling in a bf16 graph, three ways, timed on onnxruntime (CPU).

TensorRT's strongly typed networks take no bf16 Resize, so a bf16 export must
either cast around the Resize (fp32 in and out, as NVIDIA's diffusion demo
does) or write nearest 2x as Expand + Reshape (a pure copy, no Resize at
all). Each form is one small graph with the decoder's widest upsampling
input; every form's output is checked equal to torch's nearest interpolate
before it is timed. Run: OMP_NUM_THREADS=1 python -m benchmarks.bench_upsample
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

FORMS = ("resize_fp32", "cast_resize_cast", "expand_reshape")


def _graph(form: str, shape: tuple[int, int, int, int], dtype: str):
    from onnx import TensorProto, helper, numpy_helper

    elem = {"bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}[dtype]
    n, c, h, w = shape
    nodes, inits = [], []
    if form == "expand_reshape":
        inits += [
            numpy_helper.from_array(np.array([n, c, h, 1, w, 1], np.int64), "s6"),
            numpy_helper.from_array(np.array([n, c, h, 2, w, 2], np.int64), "e6"),
            numpy_helper.from_array(np.array([n, c, 2 * h, 2 * w], np.int64), "s4"),
        ]
        nodes += [
            helper.make_node("Reshape", ["x", "s6"], ["x6"]),
            helper.make_node("Expand", ["x6", "e6"], ["xe"]),
            helper.make_node("Reshape", ["xe", "s4"], ["y"]),
        ]
    else:
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        src = "x"
        if form == "cast_resize_cast":
            nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
            src = "xf"
        out = "yf" if form == "cast_resize_cast" else "y"
        nodes.append(
            helper.make_node(
                "Resize",
                [src, "", "scales"],
                [out],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        )
        if form == "cast_resize_cast":
            nodes.append(helper.make_node("Cast", ["yf"], ["y"], to=elem))
    graph = helper.make_graph(
        nodes,
        form,
        [helper.make_tensor_value_info("x", elem, list(shape))],
        [helper.make_tensor_value_info("y", elem, [n, c, 2 * h, 2 * w])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def bench(shape=(1, 96, 60, 104), repeats: int = 20, low: str = "bfloat16") -> dict:
    """Each form at `low` precision (resize_fp32 always fp32); a form onnxruntime cannot run is reported as such."""
    import onnxruntime as ort

    x = torch.randn(*shape)
    want = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    results = {}
    for form in FORMS:
        dtype = "float32" if form == "resize_fp32" else low
        model = _graph(form, shape, dtype)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        try:
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - an unsupported form is a result, not a crash
            results[form] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            continue
        if dtype == "bfloat16":
            import ml_dtypes

            feed = x.to(torch.bfloat16).float().numpy().astype(ml_dtypes.bfloat16)
            ref = want.to(torch.bfloat16).float().numpy()
        elif dtype == "float16":
            feed, ref = x.half().numpy(), want.half().float().numpy()
        else:
            feed, ref = x.numpy(), want.numpy()
        try:
            out = sess.run(None, {"x": feed})[0]
        except Exception as err:  # noqa: BLE001
            results[form] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            continue
        assert np.array_equal(np.asarray(out, np.float32), ref), form
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {"x": feed})
            times.append(time.perf_counter() - t0)
        results[form] = {"dtype": dtype, "median_ms": round(1000 * float(np.median(times)), 3)}
    return {"shape": list(shape), "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1,96,60,104", help="N,C,H,W of the upsampling input")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--low",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="the 16-bit dtype of the cast and expand forms (onnxruntime's CPU provider has few bf16 kernels: "
        "float16 or float32 measures the same data movement)",
    )
    args = p.parse_args(argv)
    print(json.dumps(bench(tuple(int(v) for v in args.shape.split(",")), args.repeats, args.low), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
