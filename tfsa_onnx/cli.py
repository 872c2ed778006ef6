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

    columns = [
        "seq_len",
        "heads",
        "head_dim",
        "threads",
        "density",
        "sparse_ms",
        "ort_mha_ms",
        "unfused_ms",
        "speedup_vs_ort_mha",
        "speedup_vs_unfused",
        "sparse_gflops",
        "ort_mha_gflops",
        "unfused_gflops",
    ]
    click.echo("  ".join(f"{c:>12}" for c in columns))
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
        click.echo("  ".join(_fmt(row[c]) for c in columns))
    if json_path:
        _write_text_atomically(json_path, json.dumps([r.as_dict() for r in results], indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot_kernel_results(results, plot_path)
        click.echo(f"wrote {plot_path}")


def _fmt(value) -> str:
    if value is None:
        return f"{'-':>12}"
    if isinstance(value, float):
        return f"{value:>12.3f}" if value < 100 else f"{value:>12.1f}"
    return f"{value:>12}"


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


if __name__ == "__main__":
    main()
