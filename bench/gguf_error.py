"""Logit error of each GGUF type: export with tunesmith, read back with transformers' GGUF loader, compare.

Usage (the model must be cached or a local directory; a run directory is merged first)::

    python bench/gguf_error.py [MODEL] [--types f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0] [--max-new-tokens 24]

For each type: max and mean |logit difference| against the float32 HF model on two texts (one plain, one
in the chat template), the file size, and whether the greedy answer to "Who are you?" is unchanged (and
the answer). The numbers in tunesmith/export/gguf.py's docstring come from this script.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunesmith.export.gguf import DTYPES, export_gguf
from tunesmith.models.load import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--types", nargs="+", default=[t for t in DTYPES if t != "f32"], choices=DTYPES)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    ref = load(args.model, dtype=torch.float32, device="cpu", merge=True)
    tok = ref.tokenizer
    texts = ["Who are you? 你是谁？ 0123 The quick brown fox.",
             tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)]
    ids = [tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                     return_tensors="pt")["input_ids"]
    with torch.no_grad():
        refs = [ref.model(i).logits for i in ids]
        answer = ref.model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)[0, prompt.shape[1]:]
    print(f"{args.model}: logits up to {max(r.abs().max().item() for r in refs):.1f}; "
          f"answer {tok.decode(answer, skip_special_tokens=True)!r}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.types:
            path = export_gguf(args.model, Path(tmp) / f"{dtype}.gguf", dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            with torch.no_grad():
                diffs = [(model(i).logits - r).abs() for i, r in zip(ids, refs, strict=True)]
                got = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)[0, prompt.shape[1]:]
            same = torch.equal(got, answer)
            print(f"{dtype:5} max {max(d.max().item() for d in diffs):7.3f}  mean "
                  f"{sum(d.mean().item() for d in diffs) / len(diffs):.4f}  {path.stat().st_size / 1e6:5.0f} MB  "
                  f"{'same answer' if same else 'differs: ' + repr(tok.decode(got, skip_special_tokens=True))}")
            path.unlink()


if __name__ == "__main__":
    main()
