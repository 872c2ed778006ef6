"""The `tfsa-onnx` command line."""

from __future__ import annotations

import click

from tfsa_onnx import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tfsa-onnx")
def main() -> None:
    """Training-free sparse attention for ONNX models."""


@main.command("library-path")
def library_path() -> None:
    """Print the path of the custom-op library (for C/C++ ONNX Runtime apps)."""
    from tfsa_onnx import get_library_path

    click.echo(get_library_path())


@main.group()
def bench() -> None:
    """Benchmarks: our kernel or a whole optimized model against ONNX Runtime's dense attention."""


def _int_list(_ctx, _param, value: str) -> list[int]:
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@bench.command("kernel")
@click.option("--seq-len", default="8192", callback=_int_list, help="Sequence length(s), comma-separated.")
@click.option("--heads", default=12, show_default=True)
@click.option("--head-dim", default=64, show_default=True)
@click.option("--batch", default=1, show_default=True)
@click.option("--max-density", default=0.125, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--block-size", default=64, show_default=True)
@click.option("--causal", is_flag=True, help="Causal attention in all three.")
@click.option("--threads", default=2, show_default=True, help="intra_op_num_threads of every session.")
@click.option("--repeat", default=5, show_default=True, help="Timed rounds (median reported).")
@click.option(
    "--no-unfused", is_flag=True, help="Skip the MatMul-Softmax-MatMul graph (it needs S^2 memory)."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Latency vs sequence length PNG.")
def bench_kernel_cmd(
    seq_len,
    heads,
    head_dim,
    batch,
    max_density,
    block_size,
    causal,
    threads,
    repeat,
    no_unfused,
    json_path,
    plot_path,
) -> None:
    """SparseAttention vs com.microsoft.MultiHeadAttention vs the unfused graph, interleaved."""
    import json

    from tfsa_onnx.bench import bench_kernel, plot_kernel_results

    columns = (
        "seq_len heads head_dim threads density sparse_ms selection_share ort_mha_ms unfused_ms "
        "speedup_vs_ort_mha speedup_vs_unfused sparse_gflops ort_mha_gflops unfused_gflops"
    ).split()
    widths = [max(10, len(c)) for c in columns]
    click.echo("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    results = []
    for s in seq_len:
        result = bench_kernel(
            s,
            heads=heads,
            head_dim=head_dim,
            batch=batch,
            max_density=max_density,
            causal=causal,
            threads=threads,
            repeat=repeat,
            block_size=block_size,
            unfused=not no_unfused,
        )
        results.append(result)
        row = result.as_dict()
        click.echo("  ".join(_fmt(row[c]).rjust(w) for c, w in zip(columns, widths, strict=True)))
    if json_path:
        _write_text_atomically(json_path, json.dumps([r.as_dict() for r in results], indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot_kernel_results(results, plot_path)
        click.echo(f"wrote {plot_path}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return str(value)


def _write_text_atomically(path: str, text: str) -> None:
    import os
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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


@main.command("optimize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Output model (default MODEL.tfsa.onnx)."
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Sparsity config (JSON/YAML).")
@click.option("--block-size", type=click.IntRange(1), help="Query/key block edge.")
@click.option("--global-tokens", type=click.IntRange(0), help="Leading tokens every query sees.")
@click.option("--local-window", type=click.IntRange(0), help="Keys always computed near each query.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), help="Estimated mass to keep.")
@click.option("--max-density", type=click.FloatRange(0, 1, min_open=True), help="Cap on key blocks computed.")
@click.option("--min-seq-len", type=click.IntRange(0), help="Dense attention below this many keys.")
@click.option("--reapply", is_flag=True, help="On an optimized model, set these attributes on its nodes.")
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False), help="Write the site report (JSON)."
)
def optimize_cmd(model, output, config_path, report_path, reapply, **attributes) -> None:
    """Replace every attention block of MODEL with ai.tfsa::SparseAttention."""
    from pathlib import Path

    from tfsa_onnx.rewrite import OptimizeError, load_ir, optimize_ir, save_ir

    source = Path(model)
    out = Path(output) if output else source.with_name(source.name.removesuffix(".onnx") + ".tfsa.onnx")
    if out.resolve() == source.resolve():
        raise click.ClickException("the output path is the input path; choose another file with -o.")
    config = _sparsity_config(config_path, attributes)
    try:
        ir_model = load_ir(source)
        report = optimize_ir(ir_model, config, reapply=reapply)
    except OptimizeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.table())
    try:
        save_ir(ir_model, out, source)
    except OptimizeError as e:
        raise click.ClickException(str(e)) from None
    if report_path:
        report.save(report_path)
    already = sum(s.family == "tfsa" for s in report.sites)
    click.echo(
        f"{len(report.sites)} attention sites, {report.replaced - already} replaced"
        + (f", {already} already SparseAttention" if already else "")
        + f"; wrote {out}"
    )


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
def inspect_cmd(model) -> None:
    """List the attention sites of MODEL; writes nothing."""
    from tfsa_onnx.rewrite import OptimizeError, find_sites

    try:
        report = find_sites(model)
    except OptimizeError as e:
        raise click.ClickException(str(e)) from None
    if not report.sites:
        raise click.ClickException("no attention block was found in the model.")
    click.echo(report.table())
    click.echo(f"{len(report.sites)} attention sites")


if __name__ == "__main__":
    main()
