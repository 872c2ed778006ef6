"""Run a tfsa-optimized model from any Python ONNX Runtime application.

    tfsa-onnx optimize model.onnx                 # writes model.tfsa.onnx
    python samples/python_app.py model.tfsa.onnx --seq-len 2048

The only tfsa-specific line is `tfsa_onnx.session_options()`, which registers the operator
library with ONNX Runtime (or: so.register_custom_ops_library(tfsa_onnx.get_library_path())).
"""

from __future__ import annotations

import argparse
import time

import onnx
import onnxruntime as ort

import tfsa_onnx
from tfsa_onnx.inputs import generate, graph_inputs
from tfsa_onnx.validate import expose_density


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="an optimized model (with ai.tfsa::SparseAttention nodes)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="intra_op_num_threads (0: ORT's default)")
    args = parser.parse_args()

    model = onnx.load(args.model)
    # Ask every SparseAttention node for its optional `density` output too.
    model_with_density, density_names = expose_density(model)

    so = tfsa_onnx.session_options()
    so.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        model_with_density.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )

    feeds = generate(model, graph_inputs(model), seq_len=args.seq_len, batch=1, samples=1)[0]
    start = time.perf_counter()
    outputs = session.run(None, feeds)
    elapsed = time.perf_counter() - start
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, outputs, strict=True):
        if name in density_names:
            print(f"{name}: mean density {value.mean():.3f}")
        else:
            print(f"{name}: shape {list(value.shape)}")
    print(f"one run at {args.seq_len} tokens: {elapsed * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
