"""optimum's own with-past export and `ORTModelForCausalLM.generate` with the library registered:
the optimized model gives the original's tokens.

optimum-onnx (0.1.0, the newest release) requires transformers < 4.58 and optimum ~= 2.1, and
fails to import with transformers 5 (`get_parameter_dtype` is gone from
`transformers.modeling_utils`). So this test installs those releases from PyPI into a folder of
its own that shadows the environment's transformers and huggingface_hub for two subprocesses
(export, then generate); the rewrite itself runs here, as a user's would. The same rule (a
prefill from an empty cache, then decode steps, equal to the original) is checked without
optimum and fast in tests/test_rewrite_kv_cache.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from test_rewrite_families import DENSE

import tfsa_onnx
from tfsa_onnx.rewrite import optimize

# The newest optimum-onnx and what it requires (its metadata: transformers<4.58, optimum~=2.1.0).
PINS = [
    "optimum-onnx==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",
    "huggingface_hub==0.36.2",
    "tokenizers==0.22.2",
]

EXPORT = """
import sys, warnings
warnings.simplefilter("ignore")
import torch, transformers as T
from optimum.exporters.onnx import main_export
torch.manual_seed(0)
config = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=100, max_position_embeddings=2048)
T.LlamaForCausalLM(config).eval().save_pretrained(sys.argv[1])
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", no_post_process=True)
"""

GENERATE = """
import json, sys, warnings
warnings.simplefilter("ignore")
import onnxruntime as ort, torch
from optimum.onnxruntime import ORTModelForCausalLM
original, optimized, library = sys.argv[1:4]
so = ort.SessionOptions()
so.register_custom_ops_library(library)
a = ORTModelForCausalLM.from_pretrained(original, use_cache=True, use_io_binding=False)
b = ORTModelForCausalLM.from_pretrained(optimized, use_cache=True, use_io_binding=False, session_options=so)
ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[1, :4] = 0  # left padding, as generate pads
args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
args |= dict(return_dict_in_generate=True, output_scores=True)
x, y = a.generate(**args), b.generate(**args)
error = max(float((p - q).abs().max()) for p, q in zip(x.scores, y.scores))
tokens = {"original": x.sequences.tolist(), "optimized": y.sequences.tolist()}
print(json.dumps({**tokens, "logits_error": error}))
"""


def _run(packages: Path, script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(packages), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_optimum_generate_gives_the_original_tokens(tmp_path) -> None:
    packages = tmp_path / "packages"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--target", str(packages), *PINS], check=True, timeout=600)
    original, optimized = tmp_path / "original", tmp_path / "optimized"
    _run(packages, EXPORT, str(tmp_path / "hf"), str(original))

    model, report = optimize(original / "model.onnx", DENSE)
    # optimum's mask[..., :key_length] (a slice that keeps every key) and the causal triangle with
    # the past offset are proven: is_causal, and the padding as a [B, 1, 1, P + S] key mask
    assert len(report.sites) == 2 and all(s.replaced and s.causal for s in report.sites), report.table()
    assert "Softmax" not in {n.op_type for n in model.graph.node}
    shutil.copytree(original, optimized, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
    onnx.save(model, str(optimized / "model.onnx"))

    tokens = json.loads(_run(packages, GENERATE, str(original), str(optimized), tfsa_onnx.get_library_path()))
    assert len(tokens["original"][0]) == 12 + 8
    assert tokens["optimized"] == tokens["original"]
    assert tokens["logits_error"] < 1e-4  # every step's logits, prefill and 7 decode steps
