"""Passkey retrieval with SmolLM2-135M-Instruct: the original ONNX model against optimized ones.

    python -m tfsa_onnx.eval.passkey ORIGINAL.onnx OPTIMIZED.onnx [...] --seq-len 2048,4096 --trials 4

A five-digit key is hidden at a depth (0.1 ... 0.9 of the filler) in repeated filler text, in a
chat-template user turn that asks for it; the assistant turn starts "The pass key is". One
forward pass over the prompt followed by the key's tokens (teacher forcing) gives, at each of
the key's positions, the model's greedy next token: a trial succeeds when all of them are the
key's, which is exactly when greedy decoding would write the key. Every model sees the same
prompts (one seed). The tokenizer is the cached SmolLM2 folder (tfsa_onnx.eval.models).
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from tfsa_onnx.runtime import make_session

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _trial(tokenizer, seq_len: int, depth: float, rng: random.Random) -> tuple[np.ndarray, int]:
    """(input_ids [1, n], n_prompt): the prompt of about seq_len tokens and then the key's tokens."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    reps = max(1, (seq_len - 120) // len(tokenizer(FILLER).input_ids))
    before = FILLER * round(reps * depth)
    user = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
        + before
        + needle
        + FILLER * (reps - round(reps * depth))
        + "\nWhat is the pass key?"
    )
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt + "The pass key is").input_ids
    answer_ids = tokenizer(" " + key).input_ids
    return np.array([prompt_ids + answer_ids], dtype=np.int64), len(prompt_ids)


def _found(session, ids: np.ndarray, n_prompt: int) -> bool:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = {i.name for i in session.get_inputs()}
    logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    greedy = logits[0, n_prompt - 1 : ids.shape[1] - 1].argmax(-1)
    return bool((greedy == ids[0, n_prompt:]).all())


def main() -> None:
    from transformers import AutoTokenizer

    from tfsa_onnx.eval.models import smollm2_dir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="the original ONNX model first, then optimized ones")
    parser.add_argument("--seq-len", default="2048,4096")
    parser.add_argument("--trials", type=int, default=4, help="per depth")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="comma-separated, 0-1")
    parser.add_argument("--seed", type=int, default=0, help="the same seed: the same prompts")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    sessions = [make_session(path, args.threads, mem_pattern=False) for path in args.models]
    print("| tokens | depth | " + " | ".join(args.models) + " |")
    print("|---:|---:|" + "---:|" * len(args.models))
    rng = random.Random(args.seed)
    totals = [0] * len(sessions)
    for seq_len in (int(x) for x in args.seq_len.split(",")):
        for depth in (float(x) for x in args.depths.split(",")):
            found = [0] * len(sessions)
            for _ in range(args.trials):
                ids, n_prompt = _trial(tokenizer, seq_len, depth, rng)
                for m, session in enumerate(sessions):
                    found[m] += _found(session, ids, n_prompt)
            totals = [t + f for t, f in zip(totals, found, strict=True)]
            cells = " | ".join(f"{f}/{args.trials}" for f in found)
            print(f"| {ids.shape[1]} | {depth} | {cells} |", flush=True)
    print("| all | - | " + " | ".join(str(t) for t in totals) + " |")


if __name__ == "__main__":
    main()
