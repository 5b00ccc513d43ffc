"""Greedy agreement of a compiled SmolLM2 artifact with torch fp32 (transformers) on 10 prompts x 64 tokens.

    python benchmarks/llm_agreement.py ARTIFACT [--tokens 64]

A prompt agrees when the 64 greedy tokens are equal, or equal up to a step where torch's top-2 logits lie within
1e-4 of each other (either token is a greedy choice; the sequences may then legitimately part).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROMPTS = (
    "The capital of France is",
    "To repair a puncture on a bicycle, first",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "Water boils at a temperature of",
    "A good way to learn a new language is",
    "def fibonacci(n):",
    "The main difference between a cat and a dog is",
    "In the morning, the baker",
    "Photosynthesis is the process by which",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    import torch

    import effc.runtime
    from effc.decoder import smollm2

    model = effc.runtime.load(args.artifact)
    hf, tokenizer = smollm2.load_hf_model(), smollm2.load_tokenizer()
    stops = set(model.manifest["decoder"]["stop_token_ids"])
    agree = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        mine = model.generate(prompt, max_new_tokens=args.tokens).tokens
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        ref = out.sequences[0, len(ids):].tolist()
        ref = ref[:next((i for i, t in enumerate(ref) if t in stops), len(ref))]
        logits = torch.cat(out.logits).numpy()
        first = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), None)
        if first is None and len(mine) == len(ref):
            verdict = "equal"
        elif first is not None and np.diff(np.sort(logits[first])[-2:])[0] <= 1e-4:
            verdict = f"tie at step {first}"
        else:
            verdict = f"DIFFERS at step {first}"
        agree += not verdict.startswith("DIFFERS")
        print(json.dumps({"prompt": prompt, "tokens": len(mine), "verdict": verdict}), flush=True)
    print(f"{agree}/{len(PROMPTS)} prompts agree with torch fp32 greedy ({args.tokens} tokens)")


if __name__ == "__main__":
    main()
