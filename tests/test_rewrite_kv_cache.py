"""A decoder exported with its KV cache (past_key_values in, present out, as optimum's
text-generation-with-past exports it): causal with the past offset proven, exact over a prefill
from an empty cache and the decode steps after it."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from conftest import DECODER, VOCAB, sessions
from test_rewrite_families import DENSE, check_structure

from tfsa_onnx.rewrite import optimize

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def _export(path) -> None:
    """TorchScript export of a tiny Llama that takes and returns its cache as tensors."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    sizes = {
        **DECODER,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": 128,
    }
    config = T.LlamaConfig(**{**sizes, "max_position_embeddings": 1100}, attn_implementation="sdpa")
    model = T.LlamaForCausalLM(config).eval()

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = T.DynamicCache(config=config)
            for i in range(LAYERS):
                cache.update(past[2 * i], past[2 * i + 1], i)
            start = past[0].shape[2]
            positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=positions,
                use_cache=True,
            )
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    past_names = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {n: {0: "batch", 2: "past"} for n in past_names}
    axes |= {"logits": {0: "batch", 1: "seq"}} | {n: {0: "batch", 2: "total"} for n in present_names}
    past = [torch.randn(2, KV_HEADS, 4, HEAD_DIM) for _ in past_names]
    args = (torch.randint(0, VOCAB, (2, 3)), torch.ones(2, 7, dtype=torch.long), *past)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithPast(),
            args,
            str(path),
            input_names=["input_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=18,
            dynamo=False,
        )


@pytest.fixture(scope="module")
def with_past(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / "llama_with_past.onnx"
    _export(path)
    return onnx.load(str(path))


def test_kv_cache_export_prefill_and_decode(with_past) -> None:
    optimized, report = optimize(with_past, DENSE)
    check_structure(with_past, optimized, layers=LAYERS)
    assert all(s.replaced and s.causal for s in report.sites), report.table()
    assert not any(s.notes for s in report.sites), report.notes()  # only the padding is kept
    a, b = sessions(with_past, optimized)
    rng = np.random.default_rng(0)
    batch, prompt = 2, 37
    ids = rng.integers(0, VOCAB, (batch, prompt)).astype(np.int64)
    mask = np.ones((batch, prompt), np.int64)
    mask[1, :5] = 0  # the second prompt is shorter: padded on the left
    past = {
        f"past_key_values.{i}.{kv}": np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)
        for i in range(LAYERS)
        for kv in ("key", "value")
    }
    names = [o.name for o in a.get_outputs()]
    for step in range(9):  # the prefill from an empty cache, then 8 decode steps
        feed = {"input_ids": ids, "attention_mask": mask, **past}
        expected, got = a.run(None, feed), b.run(None, feed)
        for name, x, y in zip(names, expected, got, strict=True):
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=0, err_msg=f"{name} at step {step}")
        ids = expected[0][:, -1:].argmax(-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        past = {
            n.replace("present", "past_key_values"): x for n, x in zip(names[1:], expected[1:], strict=True)
        }


def test_decode_steps_count_absolute_positions(with_past) -> None:
    """The rewritten nodes say their queries are the last key positions (query_positions 1), so
    a decode step past the global tokens is chosen by the estimate instead of taking every block."""
    from tfsa_onnx import DOMAIN
    from tfsa_onnx.config import SparsityConfig
    from tfsa_onnx.validation import expose_density, make_session

    sparse = SparsityConfig(
        defaults=dict(block_size=16, global_tokens=16, local_window=16, threshold=0.5, min_seq_len=0)
    )
    optimized, _ = optimize(with_past, sparse)
    nodes = [n for n in optimized.graph.node if n.domain == DOMAIN]
    assert nodes and all(onnx.helper.get_node_attr_value(n, "query_positions") == 1 for n in nodes)
    model, density_names = expose_density(optimized)
    session = make_session(model)
    rng = np.random.default_rng(1)
    past = {
        f"past_key_values.{i}.{kv}": rng.standard_normal((1, KV_HEADS, 120, HEAD_DIM)).astype(np.float32)
        for i in range(LAYERS)
        for kv in ("key", "value")
    }
    feed = {"input_ids": np.array([[3]], np.int64), "attention_mask": np.ones((1, 121), np.int64), **past}
    densities = session.run(density_names, feed)
    assert all(float(d.max()) < 1.0 for d in densities), [d.tolist() for d in densities]
