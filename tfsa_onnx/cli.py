"""The `tfsa-onnx` command line."""

from __future__ import annotations

from collections.abc import Iterable

import click

from tfsa_onnx import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tfsa-onnx")
def main() -> None:
    """Training-free sparse attention for ONNX models."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C: a write in progress removes its temporaries.
        previous = signal.signal(signal.SIGTERM, _terminate)
        click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)


@main.command("library-path")
def library_path() -> None:
    """Print the path of the custom-op library (for C/C++ ONNX Runtime apps)."""
    from tfsa_onnx import get_library_path

    click.echo(get_library_path())


@main.group()
def bench() -> None:
    """Benchmarks: our kernel, a whole optimized model or a genai folder against the dense original."""


def _int_list(_ctx, _param, value: str) -> list[int]:
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _setting(ctx, param, value):
    """A sparsity attribute option, checked like a config value (same bounds, same message)."""
    from tfsa_onnx.config import ConfigError, check_setting, parse_setting

    if value is None:
        return None
    name = param.name
    try:
        if isinstance(value, str):
            return parse_setting(name, value, param.opts[0])
        return check_setting(name, value, param.opts[0])
    except ConfigError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1]) from None


@bench.command("kernel")
@click.option("--seq-len", default="8192", callback=_int_list, help="Sequence length(s), comma-separated.")
@click.option("--heads", default=12, show_default=True)
@click.option("--kv-heads", default=0, help="CPU: key/value heads (grouped-query attention) [--heads].")
@click.option("--head-dim", default=64, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--max-density", default="0.125", show_default=True, callback=_setting)
@click.option("--block-size", default="64", show_default=True, callback=_setting)
@click.option(
    "--estimate", default="mean", show_default=True, callback=_setting, help="CPU: mean, antidiagonal, token."
)
@click.option(
    "--estimate-stride", default="16", show_default=True, callback=_setting, help="antidiagonal's stride."
)
@click.option(
    "--group-selection",
    default="head",
    show_default=True,
    callback=_setting,
    help="CPU: head, union, shared.",
)
@click.option("--causal", is_flag=True, help="Causal attention in all three.")
@click.option("--threads", default=2, show_default=True, help="intra_op_num_threads of every session.")
@click.option("--repeat", default=5, show_default=True, help="Timed rounds (median reported).")
@click.option(
    "--no-unfused", is_flag=True, help="Skip the MatMul-Softmax-MatMul graph (it needs S^2 memory)."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Latency vs sequence length PNG.")
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="cuda: our CUDA kernel vs torch SDPA (flash) and ORT's CUDA MHA (see tfsa_onnx/bench/cuda.py).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default="float16",
    show_default=True,
    help="Element type; --provider cuda only (cpu runs float32).",
)
@click.option(
    "--compute-precision",
    type=click.Choice(["float32", "bf16"]),
    default="float32",
    show_default=True,
    help="CPU: our op's compute_precision (sparse and dense; the peers stay float32).",
)
@click.option("--no-peers", is_flag=True, help="CPU: skip ORT GroupQueryAttention and torch SDPA.")
def bench_kernel_cmd(
    seq_len, no_unfused, json_path, plot_path, provider, compute_precision, no_peers, **options
) -> None:
    """SparseAttention vs our dense op and the dense peers (ORT MHA, GQA, torch SDPA), interleaved."""
    from tfsa_onnx.bench.timing import KernelCase

    if provider == "cuda":
        if options["kv_heads"] not in (0, options["heads"]):
            raise click.UsageError("--kv-heads is for --provider cpu")
        for cpu_only in ("estimate", "estimate_stride", "threads", "group_selection", "kv_heads"):
            options.pop(cpu_only)
        return _bench_kernel_cuda(seq_len, json_path, plot_path, **options)

    from tfsa_onnx.bench.cpu import KERNEL_COLUMNS, bench_kernel, plot_kernel_results

    _check_writable(json_path, plot_path)
    options.pop("dtype")
    options |= dict(compute_precision=["float32", "bf16"].index(compute_precision), peers=not no_peers)
    cases = KernelCase.each(seq_len, options)
    results = _rows(
        KERNEL_COLUMNS, json_path, (bench_kernel(c, unfused=not no_unfused, **options) for c in cases)
    )
    if plot_path:
        try:
            plot_kernel_results(results, plot_path)
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
        click.echo(f"wrote {plot_path}")


def _bench_kernel_cuda(seq_len: list[int], json_path, plot_path, **options) -> None:
    """--provider cuda: the GPU benchmark of tfsa_onnx.bench.cuda."""
    from tfsa_onnx.bench.cuda import CudaBenchError, run_bench
    from tfsa_onnx.files import OutputError

    if plot_path:
        raise click.UsageError("--plot is for --provider cpu")
    try:
        failures = run_bench(seq_len, click.echo, json_path, **options)
    except (CudaBenchError, OutputError) as e:
        raise click.ClickException(str(e)) from None
    if failures:
        raise click.ClickException("; ".join(failures))


@bench.command("model")
@click.argument("original", type=click.Path(exists=True, dir_okay=False))
@click.argument("optimized", type=click.Path(exists=True, dir_okay=False))
@click.option("--seq-len", default="4096", callback=_int_list, help="Sequence length(s), comma-separated.")
@click.option("--batch", default=1, show_default=True)
@click.option("--threads", default=2, show_default=True, help="intra_op_num_threads of every session.")
@click.option("--repeat", default=3, show_default=True, help="Timed rounds (median reported).")
@click.option("--no-fuse", is_flag=True, help="Skip the onnxruntime.transformers.optimizer baseline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def bench_model_cmd(original, optimized, seq_len, no_fuse, json_path, **options) -> None:
    """ORIGINAL vs its ORT-fused form (when fusion applies) vs OPTIMIZED, generated inputs."""
    from tfsa_onnx.bench.cpu import MODEL_COLUMNS, bench_model
    from tfsa_onnx.inputs import InputError

    try:
        _rows(
            MODEL_COLUMNS,
            json_path,
            (bench_model(original, optimized, s, fuse=not no_fuse, **options) for s in seq_len),
        )
    except InputError as e:
        raise click.ClickException(str(e)) from None


@bench.command("genai")
@click.argument("original", type=click.Path(exists=True, file_okay=False))
@click.argument("optimized", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-len", default="4096", callback=_int_list, help="Prompt length(s), comma-separated.")
@click.option("--decode-tokens", type=click.IntRange(2), default=32, show_default=True)
@click.option("--text", type=click.Path(exists=True, dir_okay=False), help="Prompt text (default: random).")
@click.option("--threads", default=2, show_default=True, help="intra_op_num_threads of both decoders.")
@click.option("--repeat", default=3, show_default=True, help="Timed rounds (median reported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def bench_genai_cmd(original, optimized, prompt_len, text, json_path, **options) -> None:
    """Two onnxruntime-genai folders through og.Generator: time to first token, decode tokens/s."""
    from tfsa_onnx.bench.genai import COLUMNS, bench_genai
    from tfsa_onnx.genai import GenaiError

    _check_writable(json_path)
    try:
        prompts = _genai_prompts(original, optimized, prompt_len, options["decode_tokens"], text)
        _rows(COLUMNS, json_path, (bench_genai(original, optimized, p, **options) for p in prompts))
    except GenaiError as e:
        raise click.ClickException(str(e)) from None


def _genai_prompts(original, optimized, lengths: list[int], decode_tokens: int, text):
    """A prompt per length (token ids, of --text or random), each checked to fit the context."""
    from pathlib import Path

    from tfsa_onnx.genai import GenaiError, read_config
    from tfsa_onnx.genai_eval import random_prompts, text_prompts

    context = min(_context_length(read_config(original)), _context_length(read_config(optimized)))
    for n in lengths:
        if n + decode_tokens > context:
            raise GenaiError(
                f"--prompt-len {n} + --decode-tokens {decode_tokens} is past the folders' context "
                f"length of {context} tokens (genai_config.json); use at most {context - decode_tokens}."
            )
        yield (
            text_prompts(original, Path(text).read_text(), n, 1) if text else random_prompts(original, n, 1)
        )[0]


def _rows(columns: str, json_path: str | None, results: Iterable) -> list:
    """Each benchmark result as a table row as soon as it is measured, then all of them as JSON."""
    table, done = _table(columns), []
    for result in results:
        done.append(result)
        table.row(result.as_dict())
    _write_json(json_path, [r.as_dict() for r in done])
    return done


def _context_length(config: dict) -> int:
    model = config["model"]
    return int(model.get("context_length") or config.get("search", {}).get("max_length") or 2**31)


def _write_json(path: str | None, data) -> None:
    from tfsa_onnx.bench.output import write_json
    from tfsa_onnx.files import OutputError

    try:
        write_json(path, data, click.echo)
    except OutputError as e:
        raise click.ClickException(str(e)) from None


def _table(columns: str):
    from tfsa_onnx.table import StreamTable

    return StreamTable(columns, click.echo)


def _write_text_atomically(path: str, text: str) -> None:
    from tfsa_onnx.files import OutputError, atomic_write_text

    try:
        atomic_write_text(path, text)
    except OutputError as e:
        raise click.ClickException(str(e)) from None


def _check_writable(*paths: str | None) -> None:
    """Before the work: every output of the command can be written (one sentence if not)."""
    from tfsa_onnx.files import OutputError, check_writable

    try:
        for path in paths:
            if path:
                check_writable(path)
    except OutputError as e:
        raise click.ClickException(str(e)) from None


def _sparsity_config(config_path, overrides: dict):
    """The config file (or the safe defaults) with command-line attributes on top."""
    from tfsa_onnx.config import ConfigError, SparsityConfig
    from tfsa_onnx.rewrite.passes import SAFE_DEFAULTS

    try:
        config = SparsityConfig.load(config_path) if config_path else SparsityConfig(dict(SAFE_DEFAULTS))
        given = {k: v for k, v in overrides.items() if v is not None}
        return SparsityConfig(defaults={**config.defaults, **given}, layers=config.layers)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _stacked(*options):
    """One decorator applying several click options, in the order given."""

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# The sparsity options optimize and calibrate share (calibrate chooses the threshold itself).
_block_options = _stacked(
    click.option("--block-size", callback=_setting, help="Query/key block edge [1, 1048576]."),
    click.option("--global-tokens", callback=_setting, help="Leading tokens every query sees."),
    click.option("--local-window", callback=_setting, help="Keys always computed near each query."),
)
_estimate_options = _stacked(
    click.option("--estimate", callback=_setting, help="mean (default), antidiagonal or token."),
    click.option("--estimate-stride", callback=_setting, help="antidiagonal: 1 pair in this many [16]."),
    click.option(
        "--group-selection",
        callback=_setting,
        help="grouped-query attention: head (default), union of a KV group's picks, shared (one estimate).",
    ),
)


@main.command("optimize")
@click.argument("model", type=click.Path())
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Output model (default MODEL.tfsa.onnx); for a genai folder the output folder (MODEL.tfsa).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Sparsity config (JSON/YAML).")
@_block_options
@click.option("--threshold", callback=_setting, help="Estimated mass to keep [0, 1].")
@click.option("--max-density", callback=_setting, help="Cap on key blocks computed (0, 1].")
@click.option("--min-seq-len", callback=_setting, help="Dense attention below this many keys.")
@_estimate_options
@click.option(
    "--compute-precision",
    callback=_setting,
    help="float32 (default) or bf16: the computed blocks' products in bf16 (CPUs with AVX512_BF16).",
)
@click.option("--reapply", is_flag=True, help="On an optimized model, set these attributes on its nodes.")
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False), help="Write the site report (JSON)."
)
def optimize_cmd(model, output, config_path, report_path, reapply, **attributes) -> None:
    """Replace every attention block of MODEL with ai.tfsa::SparseAttention.

    MODEL may be an onnxruntime-genai folder (with genai_config.json): its GroupQueryAttention
    nodes become ai.tfsa::SparseGroupQueryAttention in a new folder with the library beside it."""
    from pathlib import Path

    from tfsa_onnx.files import OutputError, same_file
    from tfsa_onnx.rewrite import OptimizeError, load_ir, optimize_ir, save_ir
    from tfsa_onnx.rewrite.passes import check_outputs

    source = Path(model)
    if source.is_dir():
        config = _sparsity_config(config_path, attributes)
        return _optimize_folder(source, output, config, reapply, report_path)
    out = Path(output) if output else source.with_name(source.name.removesuffix(".onnx") + ".tfsa.onnx")
    if same_file(out, source):
        raise click.ClickException("the output path is the input path; choose another file with -o.")
    config = _sparsity_config(config_path, attributes)
    try:
        ir_model = load_ir(source)
        # Every output is checked before anything is written: nothing is left half done.
        check_outputs(ir_model, source, [out, *([report_path] if report_path else [])])
        report = optimize_ir(ir_model, config, reapply=reapply)
    except OptimizeError as e:
        raise click.ClickException(str(e)) from None
    _echo_report(report, notes=True)
    try:
        save_ir(ir_model, out, source)
        if report_path:
            report.save(report_path)
    except (OptimizeError, OutputError) as e:
        raise click.ClickException(str(e)) from None
    _echo_done(report, config, reapply, (source, out), ("SparseAttention", str(out)))


def _optimize_folder(source, output, config, reapply: bool, report_path) -> None:
    """optimize on an onnxruntime-genai folder (tfsa_onnx.genai)."""
    from pathlib import Path

    from tfsa_onnx.genai import GenaiError, optimize_folder

    out = Path(output) if output else source.with_name(source.name + ".tfsa")
    _check_writable(report_path)
    try:
        result = optimize_folder(source, out, config, reapply=reapply, report_path=report_path)
    except GenaiError as e:
        raise click.ClickException(str(e)) from None
    _echo_report(result.report, notes=False)
    written = f"{out} ({result.model.name}, {result.library}, {len(result.copied) + 1} other files)"
    _echo_done(result.report, config, reapply, (source, out), ("sparse", written))


def _echo_report(report, notes: bool) -> None:
    """The site table, then its notes (when asked) and warnings on stderr."""
    click.echo(report.table())
    for note in report.notes() if notes else ():
        click.echo(f"note: {note}", err=True)
    for line in report.warnings:
        click.echo(f"Warning: {line}", err=True)


def _echo_done(report, config, reapply: bool, paths: tuple, wrote: tuple[str, str]) -> None:
    """optimize's last lines: what was replaced and written (wrote: what an already optimized
    site is called, what was written), the settings, and the command that checks it."""
    (source, out), (sparse_name, written) = paths, wrote
    already = sum(s.family == "tfsa" for s in report.sites)
    click.echo(
        f"{len(report.sites)} attention sites, {report.replaced - already} replaced"
        + (f", {already} already {sparse_name}" if already else "")
        + f"; wrote {written}"
    )
    click.echo(_settings_line(config, report.replaced - already, already, reapply))
    click.echo(f"check it: tfsa-onnx validate {source} {out}")


def _settings_line(config, replaced: int, already: int, reapply: bool) -> str:
    """What the run set: the new nodes' settings; existing nodes change only with --reapply."""
    settings = config.for_site(-1, "") or {}
    text = " ".join(f"{k}={v}" for k, v in settings.items() if v != ())  # () : no head_thresholds
    text += f"; {len(config.layers)} per-layer override(s)" if config.layers else ""
    if not already:
        return f"settings: {text}"
    if reapply:
        return f"settings (also set on the {already} existing SparseAttention nodes): {text}"
    if replaced:
        return (
            f"settings of the {replaced} new nodes: {text} (the {already} existing SparseAttention "
            "nodes kept theirs; --reapply sets these on them too)"
        )
    return (
        f"settings: unchanged: the {already} nodes were already SparseAttention and kept theirs; "
        f"--reapply sets {text} on them"
    )


@main.command("inspect")
@click.argument("model", type=click.Path())
def inspect_cmd(model) -> None:
    """List the attention sites of MODEL (a model file or a genai folder); writes nothing."""
    from pathlib import Path

    from tfsa_onnx.genai import GenaiError, find_folder_sites
    from tfsa_onnx.rewrite import OptimizeError, find_sites

    try:
        report = find_folder_sites(model) if Path(model).is_dir() else find_sites(model)
    except (OptimizeError, GenaiError) as e:
        raise click.ClickException(str(e)) from None
    if not report.sites:
        raise click.ClickException(report.no_sites_message())
    click.echo(report.table())
    for note in report.notes():
        click.echo(f"note: {note}", err=True)
    click.echo(f"{len(report.sites)} attention sites")


# ---------------------------------------------------------------- export


def _export_tasks() -> list[str]:
    from tfsa_onnx.exporter import TASKS  # standard library only at import: cheap

    return list(TASKS)


@main.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX model to write.")
@click.option("--task", type=click.Choice(_export_tasks()), help="Default: inferred from config.json.")
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True, help="Example length.")
@click.option("--opset", type=click.IntRange(1), help="ONNX opset (default: the exporter's).")
@click.option("--legacy-exporter", is_flag=True, help="TorchScript exporter instead of dynamo.")
@click.option("--gguf-file", help="Load the weights from this GGUF file in MODEL_DIR.")
@click.option(
    "--atol", type=click.FloatRange(0), default=1e-3, show_default=True, help="Max abs error vs torch."
)
def export_cmd(model_dir, output, **options) -> None:
    """Export the Hugging Face model in MODEL_DIR to ONNX (offline) and check it against torch."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported
    from tfsa_onnx.exporter import ExportError, export

    try:
        result = export(model_dir, output, progress=click.echo, **options)
    except ExportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {result.path} ({', '.join(result.input_names)} -> {', '.join(result.output_names)})")
    click.echo(f"next: tfsa-onnx optimize {result.path}")


# ---------------------------------------------------------------- validate / calibrate


def _input_options(f):
    """Options shared by validate and calibrate: where the samples come from."""
    options = [
        click.option(
            "--inputs", type=click.Path(exists=True, dir_okay=False), help="NPZ: one array per input."
        ),
        click.option(
            "--text", type=click.Path(exists=True, dir_okay=False), help="Text file (token stream)."
        ),
        click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), help="HF tokenizer dir."),
        click.option("--seq-len", type=click.IntRange(1), default=512, show_default=True),
        click.option("--batch", type=click.IntRange(1), default=1, show_default=True),
        click.option("--samples", type=click.IntRange(1), default=4, show_default=True),
        click.option("--threads", type=click.IntRange(1), help="ORT intra-op threads (both models)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _percent(_ctx, _param, value):
    if value is None:
        return None
    text = str(value).strip().lstrip("+")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or a percentage like 2%") from None


@main.command("validate")
@click.argument("original", type=click.Path(exists=True))
@click.argument("optimized", type=click.Path(exists=True))
@_input_options
@click.option(
    "--new-tokens",
    type=click.IntRange(0),
    default=16,
    show_default=True,
    help="genai folders: greedy tokens generated after each prompt by both (og.Generator).",
)
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--atol", type=float, help="Fail when any max abs error exceeds this.")
@click.option("--cos-min", type=float, default=0.99, show_default=True, help="Fail below this mean cosine.")
@click.option(
    "--max-ppl-increase", callback=_percent, default="2%", show_default=True, help="e.g. 2% or 0.02."
)
@click.option(
    "--extra-lengths",
    default="auto",
    show_default=True,
    help="Also check these lengths (e.g. 64,1100), 'none', or 'auto': with generated inputs, a short "
    "length and one past every window or constant in the original's masks.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
def validate_cmd(
    original,
    optimized,
    warmup,
    atol,
    cos_min,
    max_ppl_increase,
    extra_lengths,
    json_path,
    threads,
    new_tokens,
    **src,
) -> None:
    """Compare OPTIMIZED with ORIGINAL on the same inputs; exit 1 when a threshold fails.

    Two onnxruntime-genai folders: prompt logits and perplexity (on --text, tokenized by the
    folder's tokenizer, or random tokens), then --new-tokens greedy tokens through og.Generator."""
    import json
    from pathlib import Path

    if Path(original).is_dir() or Path(optimized).is_dir():
        thresholds = {"atol": atol, "cos_min": cos_min, "max_ppl_increase": max_ppl_increase}
        return _validate_folders(original, optimized, src, new_tokens, threads, thresholds, json_path)

    from tfsa_onnx.inputs import InputError, check_same_inputs, describe, graph_inputs, load_feeds
    from tfsa_onnx.validation import graph_only, validate

    _check_writable(json_path)
    try:
        original_proto = graph_only(original)  # no weights held here while the models run
        check_same_inputs(graph_inputs(original_proto), graph_inputs(graph_only(optimized)))
        feeds = load_feeds(original_proto, **src)
        extra, automatic = _extra_lengths(extra_lengths, original, src)
    except (InputError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"inputs: {describe(feeds)}", err=True)
    thresholds = {"atol": atol, "cos_min": cos_min, "max_ppl_increase": max_ppl_increase}
    result = _validate_once(validate, original, optimized, feeds, threads, warmup)
    click.echo(result.table())
    failures = result.failures(**thresholds)
    data = {**result.to_dict(), "original": original, "optimized": optimized, "seq_len": src["seq_len"]}
    data["extra_lengths"] = {}
    for n in extra:
        try:
            more = load_feeds(original_proto, **{**src, "seq_len": n, "samples": min(2, src["samples"])})
        except (InputError, OSError) as e:
            raise click.ClickException(f"at {n} tokens: {e}") from None
        try:
            checked = _validate_once(validate, original, optimized, more, threads, warmup=0)
        except click.ClickException as e:
            if not automatic:
                raise
            click.echo(f"skipped {n} tokens: {e.message}", err=True)
            continue
        click.echo(f"\nat {n} tokens ({describe(more)}):")
        click.echo(checked.table())
        found = checked.failures(**thresholds)
        failures += [f"at {n} tokens: {line}" for line in found]
        data["extra_lengths"][str(n)] = {**checked.to_dict(), "failures": found}
    if json_path:
        data["failures"] = failures
        _write_text_atomically(json_path, json.dumps(data, indent=2) + "\n")
    for line in failures:
        click.echo(f"FAIL {line}")
    click.echo("FAIL" if failures else "PASS")
    raise SystemExit(1 if failures else 0)


def _validate_folders(original, optimized, src, new_tokens, threads, thresholds, json_path) -> None:
    """validate on two onnxruntime-genai folders (tfsa_onnx.genai_eval)."""
    import json
    from pathlib import Path

    from tfsa_onnx.genai import GenaiError, is_genai_folder
    from tfsa_onnx.genai_eval import random_prompts, text_prompts, validate_folders

    if not (is_genai_folder(original) and is_genai_folder(optimized)):
        raise click.ClickException(
            "validate compares two model files or two onnxruntime-genai folders (with genai_config.json)."
        )
    if src.get("inputs"):
        raise click.ClickException("--inputs is for model files; give --text or nothing for genai folders.")
    _check_writable(json_path)
    seq_len, samples = src["seq_len"], src["samples"]
    try:
        if src.get("text"):
            prompts = text_prompts(original, Path(src["text"]).read_text(), seq_len, samples)
        else:
            prompts = random_prompts(original, seq_len, samples)
        result = validate_folders(original, optimized, prompts, new_tokens=new_tokens, threads=threads)
    except GenaiError as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:  # noqa: BLE001 - ORT and genai errors become one sentence
        raise click.ClickException(f"running the models failed: {str(e).strip().splitlines()[0]}") from None
    click.echo(f"inputs: {samples} x {seq_len} tokens ({'text' if src.get('text') else 'random'})", err=True)
    click.echo(result.table())
    failures = result.failures(**thresholds)
    if json_path:
        data = {**result.to_dict(), "original": original, "optimized": optimized, "failures": failures}
        _write_text_atomically(json_path, json.dumps(data, indent=2) + "\n")
    for line in failures:
        click.echo(f"FAIL {line}")
    click.echo("FAIL" if failures else "PASS")
    raise SystemExit(1 if failures else 0)


def _extra_lengths(option: str, original: str, src: dict) -> tuple[list[int], bool]:
    """The lengths --extra-lengths asks for, and whether they were chosen automatically."""
    from tfsa_onnx.inputs import InputError
    from tfsa_onnx.validation import check_lengths

    text = option.strip().lower()
    if text == "none":
        return [], False
    if text == "auto":
        if src.get("inputs") or src.get("text"):
            return [], True
        lengths, why = check_lengths(original, src["seq_len"])
        if lengths:
            click.echo(f"lengths: {src['seq_len']} tokens, and {why}", err=True)
        return lengths, True
    if src.get("inputs"):
        raise InputError("--extra-lengths needs generated inputs or --text, not --inputs")
    try:
        lengths = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--extra-lengths: {option!r} is not 'auto', 'none' or a length list") from None
    if any(n < 1 for n in lengths):
        raise InputError("--extra-lengths: every length must be >= 1")
    return [n for n in lengths if n != src["seq_len"]], False


def _validate_once(validate, original, optimized, feeds, threads, warmup):
    from tfsa_onnx.validation import memory_warning

    note = memory_warning([original, optimized], feeds)
    if note:
        click.echo(note, err=True)
    try:
        return validate(original, optimized, feeds, threads=threads, warmup=warmup)
    except Exception as e:  # noqa: BLE001 - ORT and shape errors become one sentence
        raise click.ClickException(f"running the models failed: {str(e).strip().splitlines()[0]}") from None


@main.command("calibrate")
@click.argument("model", type=click.Path(exists=True))
@_input_options
@click.option("--target", required=True, help="'cos>=0.995' (output vs dense) or 'ppl<=+1%' (perplexity).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Config JSON to write.")
@click.option("--output-name", help="Model output the target is measured on (default: the first).")
@_block_options
@click.option(
    "--min-seq-len",
    callback=_setting,
    help="Dense below this many keys (default: min(1024, --seq-len)).",
)
@_estimate_options
@click.option(
    "--curve-samples", type=click.IntRange(1), default=2, show_default=True, help="Samples per layer curve."
)
@click.option(
    "--per-layer",
    is_flag=True,
    help="One threshold per layer (default: one per query head, streaming heads included).",
)
@click.option(
    "--retrieval",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of planted needles (a far key one late query needs) every head must find; 0: off.",
)
@click.option(
    "--needles", type=click.IntRange(1), default=4, show_default=True, help="Needles per head (--retrieval)."
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the calibration record as JSON."
)
def calibrate_cmd(
    model,
    target,
    output,
    output_name,
    curve_samples,
    per_layer,
    retrieval,
    needles,
    json_path,
    threads,
    **options,
) -> None:
    """Choose per-head thresholds for MODEL so TARGET holds at the lowest density; writes a config.

    MODEL may be an onnxruntime-genai folder: its decoder is calibrated on prompt steps (--text,
    tokenized by the folder's tokenizer, or random tokens), and the config is for
    `tfsa-onnx optimize GENAI_DIR --config`."""
    import json
    import os

    from tfsa_onnx.calibrate import CalibrationError, Target, calibrate
    from tfsa_onnx.genai import GenaiError, decoder_path
    from tfsa_onnx.inputs import InputError, describe, load_feeds
    from tfsa_onnx.validation import graph_only, memory_warning

    src = {k: options.pop(k) for k in ("inputs", "text", "tokenizer", "seq_len", "batch", "samples")}
    base = {k: v for k, v in options.items() if v is not None}
    base.setdefault("min_seq_len", min(1024, src["seq_len"]))
    _check_writable(output, json_path)
    folder = model if os.path.isdir(model) else None
    try:
        goal = Target.parse(target)
        if folder is not None:  # decoder_path: a folder without genai_config.json is refused
            model = str(decoder_path(folder))
            feeds = _folder_feeds(folder, src)
        else:
            feeds = load_feeds(graph_only(model), **src)
        click.echo(f"calibration inputs: {describe(feeds)}", err=True)
        note = memory_warning([model], feeds, rewritten=True)
        if note:
            click.echo(note, err=True)
        result = calibrate(  # the path: no copy of the weights is kept here while calibrate runs
            model,
            feeds,
            goal,
            base=base,
            output=output_name,
            curve_samples=curve_samples,
            threads=threads,
            per_head=not per_layer,
            retrieval=retrieval,
            needles=needles,
        )
    except (CalibrationError, InputError, GenaiError, OSError) as e:
        raise click.ClickException(str(e)) from None
    _write_text_atomically(output, json.dumps(result.config.to_dict(), indent=2) + "\n")
    if json_path:
        _write_text_atomically(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    click.echo(result.table())
    out = f" -o {folder}.tfsa" if folder else ""
    click.echo(f"wrote {output}; use it with: tfsa-onnx optimize {folder or model}{out} --config {output}")


def _folder_feeds(folder: str, src: dict) -> list:
    """calibrate on a genai folder: prompt steps of --samples x --seq-len tokens of --text (the
    folder's tokenizer), or random tokens; one row each."""
    from pathlib import Path

    from tfsa_onnx.genai_eval import folder_prompt_feeds, random_prompts, text_prompts

    if src.get("inputs") or src.get("tokenizer") or src.get("batch", 1) != 1:
        raise click.ClickException(
            "on a genai folder calibrate reads --text with the folder's own tokenizer, one row per "
            "sample: drop --inputs, --tokenizer and --batch."
        )
    seq_len, samples = src["seq_len"], src["samples"]
    if src.get("text"):
        prompts = text_prompts(folder, Path(src["text"]).read_text(), seq_len, samples)
    else:
        prompts = random_prompts(folder, seq_len, samples)
    return folder_prompt_feeds(folder, prompts)


# ---------------------------------------------------------------- serving


@main.command("triton-repo")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", "repo", required=True, type=click.Path(file_okay=False), help="Model repository folder."
)
@click.option("--name", required=True, help="Model name: the folder REPO/NAME and the name clients ask for.")
@click.option("--max-batch", type=click.IntRange(0), default=8, show_default=True, help="0: no batching.")
@click.option(
    "--instance-count", type=click.IntRange(1), default=1, show_default=True, help="N on CPU, N per GPU."
)
@click.option("--gpu", is_flag=True, help="KIND_GPU instances (default KIND_CPU).")
@click.option("--library-dir", help="Absolute folder of the library in the serving container [/models/NAME].")
@click.option("--force", is_flag=True, help="Replace a non-empty REPO/NAME.")
def triton_repo_cmd(model, repo, name, max_batch, instance_count, gpu, library_dir, force) -> None:
    """Write a Triton Inference Server model repository (onnxruntime backend) serving MODEL."""
    import warnings
    from pathlib import Path

    from tfsa_onnx.triton import MOUNT, TritonRepoError, TritonRepoWarning, write_triton_repository

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TritonRepoWarning)
        try:
            target = write_triton_repository(
                model,
                repo,
                name,
                max_batch=max_batch,
                instance_count=instance_count,
                gpu=gpu,
                library_dir=library_dir,
                force=force,
            )
        except TritonRepoError as e:
            raise click.ClickException(str(e)) from None
    for w in caught:
        if issubclass(w.category, TritonRepoWarning):
            click.echo(f"Warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    click.echo(f"wrote {target}")
    if library_dir is None:
        gpus = "--gpus all " if gpu else ""
        click.echo(
            f"serve it: docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -v {Path(repo).resolve()}:{MOUNT} "
            f"nvcr.io/nvidia/tritonserver:<YY.MM>-py3 tritonserver --model-repository={MOUNT}"
        )
        click.echo("(any Triton release from 24.03 on: it needs onnxruntime >= 1.17; see docs/triton.md)")


if __name__ == "__main__":
    main()
