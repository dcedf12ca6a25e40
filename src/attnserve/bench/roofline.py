"""How close a backend runs to what the machine can do: the compute floor of a model.

A latency target only means something against the machine's arithmetic rate. We measure
that rate as the fp32 matrix-multiply throughput of ONNX Runtime's GEMM (MLAS) at the
benchmark's thread count, count the model's floating-point work with PyTorch's flop
counter (matrix multiplies and convolutions, and attention where torch has a formula for
the kernel it runs: a lower bound, elementwise work is not counted), and divide: no fp32
backend can run a call faster than that floor. On the 2-core AVX2 machine here ViT-S/16
needs 9.2 GFLOP per image (8.5 counted: torch's CPU attention kernel has no formula) and
the GEMM runs at 135-158 GFLOP/s, so 54-63 ms is the fp32 floor at batch 1.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping

import numpy as np

MATMUL_SIZE = 1024


@functools.lru_cache(maxsize=8)  # once per process and thread count: a zoo run measures it once
def matmul_gflops(threads: int, size: int = MATMUL_SIZE, seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of one [size, size] x [size, size] MatMul on ONNX Runtime with
    `threads` intra-op threads: the median of the calls made in `seconds` (after one
    warm-up call), so a busy moment does not set the figure."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the oldest IR that opset 17 needs: any ONNX Runtime we support reads it
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((size, size), dtype=np.float32),
            "b": rng.standard_normal((size, size), dtype=np.float32)}
    session.run(None, feed)
    samples, start = [], time.perf_counter()
    while not samples or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - t0)
    return 2 * size**3 / float(np.median(samples)) / 1e9


def model_gflop(model, feed: Mapping[str, np.ndarray]) -> float:
    """GFLOP of one eager call of `model` on `feed` (keyword inputs), counted by
    torch.utils.flop_counter: matrix multiplies, convolutions, attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Grad mode on: the counter's module tracker (torch 2.13) asserts on modules that
    # return several tensors under no_grad / inference_mode (CaiT's class-attention blocks).
    with torch.enable_grad(), counter:
        model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
    return counter.get_total_flops() / 1e9


def floor_ms(gflop: float, gflops: float) -> float:
    """The fastest a call of `gflop` can run at `gflops` GFLOP/s, in milliseconds."""
    return gflop / gflops * 1e3
