"""torch / Hugging Face -> ONNX helpers (used by the tests, samples and benchmarks)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx


class _KeywordWrapper:
    """Builds a torch.nn.Module that calls `model(**dict(zip(names, args)))`.

    transformers 5.x forward() signatures put arguments in slots the exporter's positional
    call does not expect; calling by keyword keeps every input where it belongs. The first
    output (last_hidden_state) is the graph's only output: enough to compare models.
    """

    @staticmethod
    def build(model: Any, names: list[str]) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(**dict(zip(names, args, strict=False)), use_cache=False, return_dict=True)
                return out[0]

        return Wrapper().eval()


def export_hf_model(
    model: Any,
    example_inputs: dict[str, Any],
    path: str | Path,
    *,
    dynamo: bool = False,
    opset: int | None = None,
    dynamic: bool = True,
) -> Path:
    """Export a Hugging Face model (called with keyword inputs) to `path`; returns the path.

    Inputs keep their names; batch and sequence dims are dynamic when `dynamic`.
    The output is named `last_hidden_state`.
    """
    import torch

    path = Path(path)
    names = list(example_inputs)
    args = tuple(example_inputs[n] for n in names)
    wrapper = _KeywordWrapper.build(model.eval(), names)
    kwargs: dict[str, Any] = {"input_names": names, "output_names": ["last_hidden_state"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic:
        if dynamo:
            # forward(*args): the varargs tuple is one entry of dynamic_shapes.
            dims = tuple(_dynamo_dims(example_inputs[n]) for n in names)
            kwargs["dynamic_shapes"] = (dims,)
        else:
            axes = {n: _ts_dims(example_inputs[n]) for n in names}
            axes["last_hidden_state"] = {0: "batch", 1: "seq"}
            kwargs["dynamic_axes"] = axes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, **kwargs)
            program.save(str(path))
        else:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, **kwargs)
    onnx.checker.check_model(str(path))
    return path


def _ts_dims(tensor: Any) -> dict[int, str]:
    """TorchScript dynamic_axes: [batch, seq, ...] for ids/masks, [batch, C, H, W] images fixed."""
    if tensor.dim() == 4:  # pixel_values: only the batch varies
        return {0: "batch"}
    return {0: "batch", 1: "seq"}


def _dynamo_dims(tensor: Any) -> dict[int, Any]:
    import torch

    auto = torch.export.Dim.AUTO
    if tensor.dim() == 4:
        return {0: auto}
    return {0: auto, 1: auto}


def load(path: str | Path) -> onnx.ModelProto:
    """Load a model with its external data."""
    return onnx.load(str(path))
