"""torch / Hugging Face -> ONNX: export a model, check it against torch, write it atomically.

`export()` is the user-facing entry point (also `tfsa-onnx export`); `export_hf_model()` is the
bare export step it builds on (the tests, samples and benchmarks call it directly).
Only the standard library is imported here at module level: torch, transformers and onnx load
on first use, so `import tfsa_onnx` stays cheap.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_TORCH_DYNAMO = (2, 5)  # torch.onnx.export(dynamo=True) with dynamic_shapes and Dim.AUTO
INSTALL_HINT = "pip install 'tfsa-onnx[export]'"
EXAMPLE_BATCH = 2
CHECK_BATCH = 3
MIN_SEQ_LEN = 3  # the example's sequence length must differ from its batch size and from 1


class ExportError(Exception):
    """The model cannot be exported; the message is one sentence for the user."""


class ExportCheckError(ExportError):
    """The exported model disagrees with torch by more than the tolerance."""

    def __init__(self, message: str, max_abs_error: float) -> None:
        super().__init__(message)
        self.max_abs_error = max_abs_error


@dataclass(frozen=True)
class Task:
    auto_class: str  # the transformers Auto class that loads a model directory for this task
    output: str  # the key of the model's output that becomes the ONNX output


TASKS = {
    "feature-extraction": Task("AutoModel", "last_hidden_state"),
    "text-generation": Task("AutoModelForCausalLM", "logits"),
    "image-classification": Task("AutoModelForImageClassification", "logits"),
}
# Class-name endings of task heads; any other architecture exports its base model.
_HEAD_SUFFIXES = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForImageClassification", "image-classification"),
)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    task: str
    input_names: list[str]
    output_names: list[str]
    max_abs_error: float


def export(
    module_or_dir: Any,
    output: str | os.PathLike,
    *,
    task: str | None = None,
    seq_len: int = 128,
    opset: int | None = None,
    legacy_exporter: bool = False,
    gguf_file: str | os.PathLike | None = None,
    atol: float = 1e-3,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a Hugging Face model (a local directory or a PreTrainedModel) to ONNX at `output`.

    The batch and sequence dims are dynamic (images: the batch). The ONNX model is run with
    onnxruntime on inputs of another shape than the export's and compared with torch; a max abs
    error above `atol` raises ExportCheckError and nothing is written. `progress` receives one
    line per step. Raises ExportError with a sentence saying what to do when export is impossible.
    """
    say = progress or (lambda _line: None)
    out = Path(output)
    if task is not None and task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if seq_len < MIN_SEQ_LEN:
        raise ExportError(f"seq_len (--seq-len) must be at least {MIN_SEQ_LEN}.")
    _require_torch(dynamo=not legacy_exporter)
    if isinstance(module_or_dir, (str, os.PathLike)):
        source = Path(module_or_dir)
        _check_output(out, [source] + ([source / gguf_file] if gguf_file is not None else []))
        say(f"loading {source}" + (f" ({gguf_file})" if gguf_file else ""))
        model, task, why = _load_directory(source, task, gguf_file)
    else:
        if gguf_file is not None:
            raise ExportError("gguf_file applies to a model directory, not to an already-built module.")
        _check_output(out, [])
        model, task, why = _from_module(module_or_dir, task)
    say(f"task: {task} ({why})")
    return _export_checked(
        model.eval(), out, task, seq_len=seq_len, opset=opset, dynamo=not legacy_exporter, atol=atol, say=say
    )


def _export_checked(
    model: Any,
    out: Path,
    task: str,
    *,
    seq_len: int,
    opset: int | None,
    dynamo: bool,
    atol: float,
    say: Callable[[str], None],
) -> ExportResult:
    """Export into a staging directory beside OUT, check against torch, then move into place."""
    output = TASKS[task].output
    _check_seq_len(model, seq_len)
    example = _model_inputs(model, EXAMPLE_BATCH, seq_len, seed=0)
    check = _model_inputs(model, CHECK_BATCH, seq_len // 2 + 1, seed=1)
    want = _torch_output(model, check, output)  # before exporting: a missing output fails fast
    out.parent.mkdir(parents=True, exist_ok=True)
    from tfsa_onnx.files import remove_stale_temporaries

    remove_stale_temporaries(out)  # staging folders of exports that were killed
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        staged = staging / out.name
        exporter = "dynamo" if dynamo else "TorchScript"
        say(f"exporting with the {exporter} exporter (example inputs: {_describe(example)})")
        try:
            export_hf_model(model, example, staged, dynamo=dynamo, opset=opset, output=output)
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types
            raise ExportError(f"the {exporter} exporter failed: {_first_sentence(e)}") from e
        say(f"checking against torch on other shapes ({_describe(check)})")
        inputs, outputs, got = _onnx_output(staged, check)
        error = _max_abs_diff(got, want)
        say(f"max abs error {error:.3g} (atol {atol:g})")
        if not error <= atol:
            raise ExportCheckError(
                f"the ONNX model differs from torch by {error:.3g}, more than atol={atol:g}; "
                "nothing was written (try the other exporter or a larger atol).",
                error,
            )
        _move_into_place(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, task, inputs, outputs, error)


# ---------------------------------------------------------------- requirements and loading


def _require_torch(*, dynamo: bool) -> None:
    try:
        import torch
    except ImportError:
        raise ExportError(
            "export needs torch: pip install torch==2.13.0 (a CPU build), then retry."
        ) from None
    found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if dynamo and found < MIN_TORCH_DYNAMO:
        need = ".".join(map(str, MIN_TORCH_DYNAMO))
        raise ExportError(
            f"the dynamo exporter needs torch>={need} (found {torch.__version__}); "
            "upgrade torch or use the TorchScript exporter (--legacy-exporter)."
        )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ExportError(f"export needs transformers: {INSTALL_HINT}") from None
    return transformers


def _load_directory(source: Path, task: str | None, gguf_file: str | os.PathLike | None) -> tuple:
    """(model in float32, task, why that task) from a local directory, without the network."""
    transformers = _transformers()
    if not source.is_dir():
        raise ExportError(f"{source} is not a directory; pass a Hugging Face model directory.")
    options: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        options["gguf_file"] = str(_gguf_path(source, gguf_file))
    elif not (source / "config.json").is_file():
        raise ExportError(
            f"{source} has no config.json; pass a directory written by save_pretrained "
            "(or the GGUF file in it with gguf_file / --gguf-file)."
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), **options)
    except (ValueError, KeyError, OSError) as e:
        raise ExportError(
            f"transformers {transformers.__version__} cannot read the model in {source} "
            f"({_first_sentence(e)}); a newer transformers may support it."
        ) from None
    why = "given"
    if task is None:
        task, why = infer_task(config)
    auto_class = getattr(transformers, TASKS[task].auto_class)
    try:
        model = auto_class.from_pretrained(str(source), config=config, **options, **_float32(transformers))
    except ValueError:
        raise ExportError(
            f"the architecture {_architecture(config)} does not support the task {task}; "
            "pass another task or none (to infer it)."
        ) from None
    except (OSError, ImportError) as e:
        raise ExportError(f"loading the model from {source} failed: {_first_sentence(e)}") from None
    return model, task, why


def _gguf_path(source: Path, gguf_file: str | os.PathLike) -> Path:
    path = source / gguf_file  # an absolute gguf_file stays as it is
    if not path.is_file():
        raise ExportError(f"the GGUF file {path} does not exist; check gguf_file / --gguf-file.")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ExportError("reading GGUF files needs the gguf package: pip install gguf")
    return path


def _float32(transformers: Any) -> dict[str, Any]:
    """Load weights as float32 (transformers 5 would keep a checkpoint's bfloat16 by default)."""
    import torch

    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if major_minor >= (4, 56) else "torch_dtype": torch.float32}


def _from_module(model: Any, task: str | None) -> tuple:
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ExportError(
            "pass a Hugging Face model directory or a transformers PreTrainedModel, "
            f"not a {type(model).__name__}."
        )
    if task is not None:
        return model, task, "given"
    return (model, *infer_task(model.config, type(model).__name__))


def infer_task(config: Any, class_name: str | None = None) -> tuple[str, str]:
    """(task, why): from the class name, else config.architectures, else config.model_type."""
    names = [class_name] if class_name else list(getattr(config, "architectures", None) or [])
    for name in names:
        for suffix, task in _HEAD_SUFFIXES:
            if name.endswith(suffix):
                return task, f"inferred from the architecture {name}"
    if names:
        return "feature-extraction", f"inferred from the architecture {names[0]}"
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None)
    # Decoder-only model types have a causal-LM head and no masked-LM head.
    if (
        model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "text-generation", f"inferred from model_type {model_type}"
    return "feature-extraction", f"inferred from model_type {model_type}"


def _architecture(config: Any) -> str:
    names = getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")]
    return str(names[0])


# ---------------------------------------------------------------- inputs


def _check_seq_len(model: Any, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if _main_input(model) == "input_ids" and isinstance(limit, int) and seq_len > limit:
        raise ExportError(
            f"seq_len {seq_len} is more than the model's {limit} positions; "
            "pass a smaller seq_len (--seq-len)."
        )


def _main_input(model: Any) -> str:
    name = getattr(model, "main_input_name", "input_ids")
    if name not in ("input_ids", "pixel_values"):
        raise ExportError(
            f"{type(model).__name__} takes {name}; tfsa-onnx exports text models (input_ids) "
            "and image models (pixel_values) only."
        )
    return name


def _model_inputs(model: Any, batch: int, seq_len: int, seed: int) -> dict[str, Any]:
    """Random inputs: images, or token ids with the last row right-padded."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if _main_input(model) == "pixel_values":
        return {"pixel_values": torch.randn(batch, *_image_shape(config), generator=generator)}
    vocab = model.get_input_embeddings().num_embeddings
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}
    accepted = inspect.signature(model.forward).parameters
    if "attention_mask" in accepted:
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        mask[-1, seq_len * 2 // 3 :] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in accepted and getattr(config, "type_vocab_size", 0) > 1:
        segments = torch.zeros(batch, seq_len, dtype=torch.long)
        segments[:, seq_len // 2 :] = 1
        inputs["token_type_ids"] = segments
    return inputs


def _image_shape(config: Any) -> tuple[int, int, int]:
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if size is None:
        raise ExportError("the model config has no image_size; set it so that example images can be built.")
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return channels, height, width


def _describe(inputs: dict[str, Any]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, t.shape))}" for name, t in inputs.items())


# ---------------------------------------------------------------- checking and writing


def _torch_output(model: Any, inputs: dict[str, Any], output: str) -> Any:
    import torch

    wrapper = _KeywordWrapper.build(model, list(inputs), output)
    with torch.no_grad():
        return wrapper(*inputs.values()).float().numpy()


def _onnx_output(path: Path, inputs: dict[str, Any]) -> tuple[list[str], list[str], Any]:
    """(input names, output names, first output) of the ONNX model run by onnxruntime on CPU."""
    from tfsa_onnx.runtime import make_session

    session = make_session(path, register=False)
    names = [i.name for i in session.get_inputs()]
    unknown = sorted(set(names) - set(inputs))
    if unknown:
        raise ExportError(f"the exported model has inputs {unknown} that the model's forward() did not get.")
    try:
        got = session.run(None, {n: inputs[n].numpy() for n in names})[0]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise ExportError(
            "the exported model fails on inputs of another shape than the example's "
            f"({_first_sentence(e)}); try the other exporter."
        ) from None
    return names, [o.name for o in session.get_outputs()], got


def _max_abs_diff(got: Any, want: Any) -> float:
    """max |got - want|; NaN in both counts as equal, NaN in one (or a shape mismatch) as infinite."""
    import numpy as np

    if got.shape != want.shape:
        return float("inf")
    diff = np.abs(got.astype(np.float32) - want)
    diff[np.isnan(got) & np.isnan(want)] = 0
    diff[np.isnan(diff)] = np.inf
    return float(diff.max()) if diff.size else 0.0


def _check_output(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is a directory or that would replace an input (or a file inside one)."""
    if out.is_dir():
        raise ExportError(f"the output {out} is a directory; pass a file path such as model.onnx.")
    for target in (out, out.with_name(out.name + ".data")):
        if not target.exists():
            continue
        resolved = target.resolve()
        for given in inputs:
            if resolved == given.resolve() or given.resolve() in resolved.parents:
                raise ExportError(f"{target} is a file of the input model; choose another output path.")


def _move_into_place(staged: Path, out: Path) -> None:
    """Move a model (and its external data, as one file) from staging to OUT.

    files.write_model() does the switch: the weights get a name the current OUT does not use
    (OUT.data or OUT.1.data), the graph naming them replaces OUT in one rename, the old weights
    go after; a reader never sees a graph without its weights.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from tfsa_onnx.files import OutputError, write_model

    locations = _external_locations(staged)
    if len(locations) > 1:
        staged = _consolidate_external_data(staged, out.name + ".data")

    def save(graph: str, data_name: str | None) -> None:
        if data_name is None:
            os.replace(staged, graph)
            return
        model = onnx.load(str(staged), load_external_data=False)
        (location,) = {
            e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"
        }
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
        Path(graph).write_bytes(model.SerializeToString())
        os.replace(staged.parent / location, Path(graph).with_name(data_name))

    try:
        write_model(out, save, external=bool(locations))
    except OutputError as e:
        raise ExportError(str(e)) from None


def _external_locations(path: Path) -> set[str]:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


def _consolidate_external_data(staged: Path, data_name: str) -> Path:
    """Rewrite a model whose weights are spread over many files (the TorchScript exporter's way
    for models over 2 GB) with one data file beside it; this loads the weights into memory."""
    import onnx

    merged = staged.parent / "merged" / staged.name
    merged.parent.mkdir()
    model = onnx.load(str(staged))
    onnx.save_model(model, str(merged), save_as_external_data=True, location=data_name)
    return merged


def _first_sentence(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


# ---------------------------------------------------------------- the export step


class _KeywordWrapper:
    """Builds a torch.nn.Module that calls `model(**dict(zip(names, args)))`.

    transformers 5.x forward() signatures put arguments in slots the exporter's positional
    call does not expect; calling by keyword keeps every input where it belongs. One output
    of the model (by key, or the first) is the graph's only output.
    """

    @staticmethod
    def build(model: Any, names: list[str], output: str | None = None) -> Any:
        import torch

        fixed: dict[str, Any] = {"return_dict": True}
        if _accepts(model, "use_cache"):
            fixed["use_cache"] = False  # prefill only: no KV-cache outputs

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(**dict(zip(names, args, strict=False)), **fixed)
                if output is None:
                    return out[0]
                if output not in out:
                    raise ExportError(
                        f"{type(model).__name__} has no {output} output; pass the task its head provides."
                    )
                return out[output]

        return Wrapper().eval()


def _accepts(model: Any, name: str) -> bool:
    params = inspect.signature(model.forward).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def export_hf_model(
    model: Any,
    example_inputs: dict[str, Any],
    path: str | Path,
    *,
    dynamo: bool = False,
    opset: int | None = None,
    dynamic: bool = True,
    output: str | None = None,
) -> Path:
    """Export a Hugging Face model (called with keyword inputs) to `path`; returns the path.

    Inputs keep their names; batch and sequence dims are dynamic when `dynamic`. `output` picks
    the model output to export by key ("logits", ...) and names the graph output after it; by
    default the first output is exported as `last_hidden_state`.
    """
    import onnx
    import torch

    path = Path(path)
    names = list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    wrapper = _KeywordWrapper.build(model.eval(), names, output)
    output_name = output or "last_hidden_state"
    kwargs: dict[str, Any] = {"input_names": names, "output_names": [output_name]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic:
        if dynamo:
            # forward(*args): the varargs tuple is one entry of dynamic_shapes.
            dims = tuple(_dynamo_dims(example_inputs[n]) for n in names)
            kwargs["dynamic_shapes"] = (dims,)
        else:
            axes = {n: _ts_dims(n, example_inputs[n]) for n in names}
            images_only = all(t.dim() == 4 for t in example_inputs.values())
            # an encoder-decoder's output follows the decoder's length
            seq = "decoder_seq" if any(n.startswith("decoder_") for n in names) else "seq"
            axes[output_name] = {0: "batch"} if images_only else {0: "batch", 1: seq}
            kwargs["dynamic_axes"] = axes
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_registry():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, **kwargs)
            program.save(str(path))
        else:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, **kwargs)
    onnx.checker.check_model(str(path))
    return path


@contextlib.contextmanager
def _quiet_exporter_registry():
    """Hide the dynamo exporter's notes about optional torchvision ops it cannot register."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ts_dims(name: str, tensor: Any) -> dict[int, str]:
    """TorchScript dynamic_axes: [batch, seq, ...] for ids/masks (decoder_* inputs of an
    encoder-decoder: their own length), [batch, C, H, W] images and audio features fixed."""
    if tensor.dim() != 2:  # pixel_values, input_features: only the batch varies
        return {0: "batch"}
    return {0: "batch", 1: "decoder_seq" if name.startswith("decoder_") else "seq"}


def _dynamo_dims(tensor: Any) -> dict[int, Any]:
    import torch

    auto = torch.export.Dim.AUTO
    if tensor.dim() != 2:
        return {0: auto}
    return {0: auto, 1: auto}
