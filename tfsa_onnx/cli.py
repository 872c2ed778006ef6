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


if __name__ == "__main__":
    main()
