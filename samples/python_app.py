"""Sentence embeddings from a tfsa-optimized text encoder, with nothing but ONNX Runtime.

    tfsa-onnx optimize minilm.onnx -o minilm.tfsa.onnx
    python samples/python_app.py minilm.tfsa.onnx --tokenizer MODEL_DIR "first text" "second text"

MODEL_DIR holds the model's tokenizer.json (Hugging Face's fast-tokenizer file). The texts are
tokenized as one padded batch, run, mean-pooled over their real tokens (the attention mask) and
L2-normalised, as sentence-transformers does for all-MiniLM-L6-v2; it prints each text's
embedding size and the texts' cosine similarities. The only tfsa-specific line registers the
operator library with ONNX Runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from tfsa_onnx import get_library_path


def load_tokenizer(directory: Path, max_length: int) -> Tokenizer:
    """The directory's tokenizer.json, padding each batch to its longest text (not a fixed length)."""
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # The file's pad token if it names one; the mask hides padding, so any id works otherwise.
    pad_token = (tokenizer.padding or {}).get("pad_token", "[PAD]")
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
    tokenizer.enable_truncation(max_length)
    return tokenizer


def make_session(model: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(get_library_path())  # ai.tfsa::SparseAttention
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def embed(session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """[len(texts), hidden] unit vectors: the model's first output, mean-pooled over real tokens."""
    batch = tokenizer.encode_batch(texts)
    columns = {
        "input_ids": [e.ids for e in batch],
        "attention_mask": [e.attention_mask for e in batch],
        "token_type_ids": [e.type_ids for e in batch],
    }
    feeds = {i.name: np.array(columns[i.name], dtype=np.int64) for i in session.get_inputs()}
    hidden = session.run(None, feeds)[0]  # [batch, tokens, hidden]
    mask = np.array(columns["attention_mask"], dtype=np.float32)[:, :, None]
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="an optimized text encoder (.tfsa.onnx)")
    parser.add_argument("texts", nargs="+", help="texts to embed")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    parser.add_argument("--max-length", type=int, default=512, help="tokens kept per text")
    parser.add_argument("--threads", type=int, default=0, help="intra_op_num_threads (0: ORT's default)")
    parser.add_argument("--save", type=Path, help="also write the embeddings to this .npy file")
    args = parser.parse_args()

    session = make_session(args.model, args.threads)
    embeddings = embed(session, load_tokenizer(args.tokenizer, args.max_length), args.texts)
    for i, text in enumerate(args.texts):
        print(f"[{i}] {embeddings.shape[1]} dims  {text[:60]!r}")
    print("cosine similarities:")
    for row in embeddings @ embeddings.T:
        print("  " + "  ".join(f"{v:6.3f}" for v in row))
    if args.save:
        np.save(args.save, embeddings)


if __name__ == "__main__":
    main()
