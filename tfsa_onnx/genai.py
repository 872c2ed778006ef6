"""onnxruntime-genai model folders: `tfsa-onnx optimize GENAI_DIR -o OUT_DIR`.

A folder holding genai_config.json is a genai folder (what onnxruntime_genai.models.builder
writes: the decoder model, its external data, genai_config.json, tokenizer files). OUT_DIR
gets the rewritten decoder (each com.microsoft.GroupQueryAttention node becomes
ai.tfsa::SparseGroupQueryAttention), the operator library beside it, genai_config.json naming
that library in model.decoder.session_options.custom_ops_library (a file name: genai loads a
custom-op library from the model folder), and a copy of every other file. The folder is
built beside OUT_DIR and renamed into place (files.write_folder); GENAI_DIR is only read.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfsa_onnx import GQA_OP_TYPE

CONFIG = "genai_config.json"
# Our libraries' file names (tfsa_onnx._CPU_LIBRARIES and _CUDA_LIBRARIES): a folder whose config
# names one of them is a previous output of optimize, which may be replaced.
LIBRARIES = (
    "libtfsa_ops.so",
    "libtfsa_ops.dylib",
    "tfsa_ops.dll",
    "libtfsa_ops_cuda.so",
    "tfsa_ops_cuda.dll",
)


class GenaiError(Exception):
    """The folder cannot be used or written; the message is one sentence for the user."""


def is_genai_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """genai_config.json of a folder, checked to name a decoder model file inside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GenaiError(f"{folder} is not a folder.")
    path = folder / CONFIG
    if not path.is_file():
        raise GenaiError(
            f"{folder} is a folder without {CONFIG}; give an ONNX model file or an onnxruntime-genai "
            "model folder (what onnxruntime_genai.models.builder writes)."
        )
    try:
        config = json.loads(path.read_text())
        filename = config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GenaiError(f"{path} is not a readable genai config ({type(e).__name__}: {e}).") from None
    parts = Path(filename).parts
    if not isinstance(filename, str) or Path(filename).is_absolute() or ".." in parts or not parts:
        raise GenaiError(f"{path} names the decoder {filename!r}, which is not a file inside {folder}.")
    if not (folder / filename).is_file():
        raise GenaiError(f"{folder / filename}, the decoder {CONFIG} names, is missing.")
    return config


def decoder_path(folder: str | os.PathLike, config: dict[str, Any] | None = None) -> Path:
    config = read_config(folder) if config is None else config
    return Path(folder) / config["model"]["decoder"]["filename"]


def custom_ops_library(config: dict[str, Any]) -> str | None:
    return (config["model"]["decoder"].get("session_options") or {}).get("custom_ops_library")


def uses_cuda(config: dict[str, Any]) -> bool:
    """True when the decoder's provider_options name the CUDA provider."""
    options = (config["model"]["decoder"].get("session_options") or {}).get("provider_options") or []
    return any("cuda" in entry for entry in options if isinstance(entry, dict))


# ---------------------------------------------------------------- checks before writing


def check_output_folder(source: Path, out: Path) -> None:
    """Refuse OUT_DIR equal to, inside or around GENAI_DIR, and a non-empty OUT_DIR that is not
    a previous output of optimize (it would be replaced)."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src):
        raise GenaiError(
            f"the output folder {out} is {'' if dst == src else 'inside '}the input folder {source}; "
            "choose a folder outside it."
        )
    if src.is_relative_to(dst):
        raise GenaiError(f"the input folder {source} is inside the output folder {out}; choose another one.")
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise GenaiError(f"{out} exists and is not a folder; choose another output folder.")
    if out.is_dir() and any(out.iterdir()) and not is_previous_output(out):
        raise GenaiError(
            f"{out} is not empty and is not a folder written by tfsa-onnx optimize; choose an empty "
            "or new folder."
        )


def is_previous_output(folder: Path) -> bool:
    """A folder this module wrote: its config names one of our libraries, which is beside it."""
    try:
        config = json.loads((folder / CONFIG).read_text())
        library = custom_ops_library(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return library in LIBRARIES and (folder / library).is_file()


def _library(config: dict[str, Any], source: Path) -> tuple[Path, list[str]]:
    """The library to ship (the CUDA build for a CUDA folder when it was built, else the CPU one)
    and the warnings to print."""
    from tfsa_onnx import get_library_path

    named = custom_ops_library(config)
    if named is not None and Path(named).name not in LIBRARIES:
        raise GenaiError(
            f"{source / CONFIG} already names the custom-op library {named!r}; genai loads one per "
            "model, so this folder cannot also load ours."
        )
    try:
        cpu = Path(get_library_path("cpu"))
    except FileNotFoundError as e:
        raise GenaiError(str(e)) from None
    if not uses_cuda(config):
        return cpu, []
    # The CUDA library registers SparseGroupQueryAttention for CUDAExecutionProvider as well.
    try:
        return Path(get_library_path("cuda")), []
    except FileNotFoundError:
        note = (
            f"{source} runs on CUDA, but the CUDA build of the operator library was not found: "
            f"the folder gets the CPU library, and ONNX Runtime runs the {GQA_OP_TYPE} nodes on the "
            "CPU, copying their tensors to and from the GPU (build the library with a CUDA compiler)."
        )
        return cpu, [note]


# ---------------------------------------------------------------- optimize


@dataclass
class FolderResult:
    report: Any  # rewrite.Report
    model: Path  # the decoder written in OUT_DIR
    library: str  # its file name, as genai_config.json names it
    copied: list[str]  # the other files, relative to the folder


def find_folder_sites(folder: str | os.PathLike):
    """inspect on a genai folder: the attention sites of its decoder (rewrite.Report)."""
    from tfsa_onnx.rewrite import OptimizeError, find_sites

    path = decoder_path(folder)
    try:
        return find_sites(path)
    except OptimizeError as e:
        raise GenaiError(str(e)) from None


def optimize_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: Any = None,
    *,
    reapply: bool = False,
    report_path: str | os.PathLike | None = None,
) -> FolderResult:
    """Write OUT_DIR from GENAI_DIR (module doc); everything is checked before anything is written."""
    from tfsa_onnx.rewrite import OptimizeError, load_ir, optimize_ir
    from tfsa_onnx.rewrite.passes import input_files

    source, out = Path(source), Path(out)
    genai = read_config(source)
    check_output_folder(source, out)
    library, notes = _library(genai, source)
    model_path = decoder_path(source, genai)
    try:
        model = load_ir(model_path)
        report = optimize_ir(model, config, reapply=reapply)
    except OptimizeError as e:
        raise GenaiError(str(e)) from None
    _check_replaced(report)
    report.warnings += notes
    rewritten = {p.resolve() for p in input_files(model, model_path)}
    copied = _other_files(source, rewritten)
    genai = _with_library(genai, library.name)

    def fill(tmp: Path) -> None:
        _save(model, tmp / model_path.relative_to(source), model_path)
        for name in copied:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, tmp / name)
        shutil.copy2(library, tmp / library.name)
        (tmp / CONFIG).write_text(json.dumps(genai, indent=4) + "\n")

    from tfsa_onnx.files import OutputError, write_folder

    try:
        write_folder(out, fill)
    except (OSError, OutputError) as e:
        raise GenaiError(f"writing {out} failed ({e}); nothing was changed.") from None
    if report_path is not None:
        report.save(report_path)
    return FolderResult(report, out / model_path.relative_to(source), library.name, copied)


def _check_replaced(report) -> None:
    """Refuse a folder where no GQA node can be replaced: the reasons, nothing written."""
    if any(s.replaced for s in report.sites):
        return
    reasons = "; ".join(f"layer {s.layer}: {s.reason}" for s in report.sites if s.reason)
    raise GenaiError(
        f"no attention node of the folder's decoder can become {GQA_OP_TYPE} ({reasons}); "
        "nothing was written."
    )


def _other_files(source: Path, rewritten: set[Path]) -> list[str]:
    """Every file of the folder but the decoder, its data and the config, relative to the folder."""
    out = []
    for path in sorted(source.rglob("*")):
        if path.is_dir() or path.resolve() in rewritten or path.name == CONFIG and path.parent == source:
            continue
        out.append(str(path.relative_to(source)))
    return out


def _with_library(config: dict[str, Any], library: str) -> dict[str, Any]:
    config = json.loads(json.dumps(config))  # a deep copy: the input's config is only read
    decoder = config["model"]["decoder"]
    decoder.setdefault("session_options", {})["custom_ops_library"] = library
    return config


def _save(model, path: Path, source: Path) -> None:
    """The decoder, with external data when the input has it (rewrite.save_ir, atomic)."""
    from tfsa_onnx.rewrite import OptimizeError, save_ir

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_ir(model, path, source)
    except OptimizeError as e:
        raise OSError(str(e)) from None
