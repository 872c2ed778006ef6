"""The accuracy table: real models on BBC News text, safe defaults vs calibrated configs.

    python -m tfsa_onnx.eval.table                 # MiniLM 256/512, SmolLM2 2k/4k
    python -m tfsa_onnx.eval.table --long          # + SmolLM2 at 8,192 tokens
    python -m tfsa_onnx.eval.table --only minilm   # one family

Calibration uses the 'calib' documents, validation the disjoint 'eval' documents. Every figure
is measured with the real kernel in ONNX Runtime; the markdown table goes to stdout and, with
--out, to a file (with a JSON record next to it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import onnx

from tfsa_onnx.inputs import Feed, graph_inputs, load_text
from tfsa_onnx.table import markdown_table
from tfsa_onnx.validation import validate


@dataclass
class Case:
    model: str
    seq_len: int
    target: str
    onnx_path: Callable[[], Path]
    tokenizer_dir: Callable[[], Path]
    calib_samples: int = 4
    eval_samples: int = 8
    structures: list[dict[str, int]] = field(default_factory=lambda: [{}])


def cases(long: bool = False) -> list[Case]:
    from tfsa_onnx.eval import models as m

    small = {"block_size": 32, "global_tokens": 32, "local_window": 32}
    minilm = {"onnx_path": m.minilm_onnx, "tokenizer_dir": m.minilm_dir, "structures": [{}, small]}
    smol = {"onnx_path": m.smollm2_onnx, "tokenizer_dir": m.smollm2_dir}
    out = [
        Case("all-MiniLM-L6-v2", 256, "cos>=0.997", **minilm),
        Case("all-MiniLM-L6-v2", 512, "cos>=0.997", **minilm),
        Case("SmolLM2-135M", 2048, "ppl<=+1%", calib_samples=2, eval_samples=3, **smol),
        Case("SmolLM2-135M", 4096, "ppl<=+1%", calib_samples=1, eval_samples=2, **smol),
    ]
    if long:
        out.append(Case("SmolLM2-135M", 8192, "ppl<=+1%", calib_samples=1, eval_samples=2, **smol))
    return out


def run_case(
    model_path: str | Path,
    calib: list[Feed],
    evaluation: list[Feed],
    target: str,
    structures: list[dict[str, int]],
    seq_len: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows for one model and length: the safe defaults, then one calibrated config per structure."""
    from tfsa_onnx import optimize
    from tfsa_onnx.calibrate import calibrate
    from tfsa_onnx.config import SparsityConfig
    from tfsa_onnx.rewrite.passes import SAFE_DEFAULTS

    model = onnx.load(str(model_path))
    min_len = min(1024, seq_len)
    defaults = {**SAFE_DEFAULTS, "min_seq_len": min_len}
    rows = [
        _row("defaults " + _short(defaults), optimize(model, SparsityConfig(defaults))[0], model, evaluation)
    ]
    for structure in structures:
        start = time.perf_counter()
        base = {**structure, "min_seq_len": min_len}
        result = calibrate(model, calib, target, base=base, progress=progress)
        took = time.perf_counter() - start
        optimized = optimize(model, result.config)[0]
        label = f"calibrated {target}" + (f" {_short(structure)}" if structure else "")
        row = _row(label, optimized, model, evaluation)
        row.update(calib_density=result.density, calib_score=result.score, calib_seconds=took)
        row["config"] = result.config.to_dict()
        rows.append(row)
    return rows


def _short(values: dict[str, Any]) -> str:
    names = {
        "block_size": "b",
        "global_tokens": "g",
        "local_window": "w",
        "threshold": "t",
        "max_density": "md",
    }
    return ",".join(f"{names[k]}={v:g}" for k, v in values.items() if k in names)


def _row(label: str, optimized: onnx.ModelProto, model: onnx.ModelProto, evaluation: list[Feed]) -> dict:
    result = validate(model, optimized, evaluation, progress=False)
    out_name, figures = next(iter(result.outputs.items()))
    row = {
        "config": label,
        "label": label,
        "output": out_name,
        "density": result.density,
        "cosine_mean": figures["cosine_mean"],
        "cosine_min": figures["cosine_min"],
        "speedup": result.speedup,
        "latency_original_s": result.latency_original_s,
        "latency_optimized_s": result.latency_optimized_s,
    }
    for key in ("perplexity_original", "perplexity_optimized", "perplexity_increase"):
        if key in figures:
            row[key] = figures[key]
    return row


def markdown(records: list[dict[str, Any]]) -> str:
    head = (
        "model",
        "tokens",
        "config",
        "density",
        "cosine mean (min)",
        "perplexity dense → optimized",
        "speedup",
    )
    return markdown_table(head, "lrlrrrr", [_markdown_cells(r) for r in records])


def _markdown_cells(r: dict[str, Any]) -> list[str]:
    ppl = "-"
    if "perplexity_original" in r:
        dense, sparse = r["perplexity_original"], r["perplexity_optimized"]
        ppl = f"{dense:.3f} → {sparse:.3f} ({r['perplexity_increase']:+.2%})"
    density = f"{r['density']:.3f}" if r["density"] is not None else "-"
    cosine = f"{r['cosine_mean']:.5f} ({r['cosine_min']:.5f})"
    return [r["model"], str(r["seq_len"]), r["label"], density, cosine, ppl, f"{r['speedup']:.2f}x"]


@click.command()
@click.option("--long", is_flag=True, help="Also SmolLM2 at 8,192 tokens.")
@click.option("--only", type=click.Choice(["minilm", "smollm2"]), help="One model family.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the markdown table here (+ .json).")
def main(long: bool, only: str | None, out: str | None) -> None:
    """Reproduce the accuracy table (see docs/accuracy.md)."""
    from tfsa_onnx.eval import models as m

    records = []
    for case in cases(long):
        if only and only not in case.model.lower().replace("-", ""):
            continue
        path = case.onnx_path()
        specs = graph_inputs(onnx.load(str(path), load_external_data=False))
        tok = case.tokenizer_dir()
        calib = load_text(m.bbc_texts("calib"), tok, specs, seq_len=case.seq_len, samples=case.calib_samples)
        evaluation = load_text(
            m.bbc_texts("eval"), tok, specs, seq_len=case.seq_len, samples=case.eval_samples
        )
        click.echo(
            f"{case.model} at {case.seq_len} tokens: calibrate on {len(calib)}, validate on {len(evaluation)}"
        )
        for row in run_case(path, calib, evaluation, case.target, case.structures, case.seq_len):
            records.append({"model": case.model, "seq_len": case.seq_len, "samples": len(evaluation), **row})
            click.echo(markdown(records[-1:]).splitlines()[-1])
            _write(out, records)  # after every row: a long run that dies keeps what it measured
    click.echo(markdown(records))


def _write(out: str | None, records: list[dict[str, Any]]) -> None:
    if out:
        Path(out).write_text(markdown(records) + "\n")
        Path(out).with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
