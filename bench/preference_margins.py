"""Where along the answer preference tuning moves the log-probabilities, and whether that reaches the greedy answer.

For each trained run and each held-out pair, both answers are scored token by token by the run and by its base
(the adapter disabled), and the change (run - base) is split at the first token where the two answers differ:

- ``shared``: the change per token on the tokens both answers share before that point (for a sign-off at the
  end, the whole answer; DPO's gradient on them cancels between the two sides);
- ``chosen@split`` / ``rejected@split``: the change of the first differing token on each side (for the sign-off,
  the sign-off's first token against the end-of-turn token that ends the rejected answer);
- ``wins@split``: the fraction of pairs where, after the shared part, the run gives the chosen side's token a
  higher probability than the rejected side's: what greedy decoding needs to follow the preference there;
- ``after``: the change per token on the chosen answer's tokens after the split;
- ``end@chosen``: the change of the chosen answer's last token, its end of turn: DPO pushes end-of-turn down
  where the rejected answer ends, and a model that learns "never end here" without "end after the sign-off"
  repeats the sign-off until the token cap.

Usage: ``python bench/preference_margins.py --data PAIRS RUN [RUN ...]`` (runs trained as adapters, on pairs
from bench/preference_pairs.py or any pair file).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from tunesmith.data.pairs import encode_pairs, load_pairs
from tunesmith.data.tokenize import EncodeOptions
from tunesmith.models.load import load


def token_logps(model, input_ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens before it) for t = 1..n-1."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return F.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]


def split_point(chosen, rejected) -> int:
    """Index (in the shifted label arrays) of the first answer token where the two sides differ."""
    labels_c, labels_r = chosen.labels[1:], rejected.labels[1:]
    for i, (a, b) in enumerate(zip(labels_c, labels_r, strict=False)):
        if (a != -100 or b != -100) and a != b:
            return i
    return min(len(labels_c), len(labels_r))


def pair_changes(model, pair) -> dict:
    """The run's log-probability changes over its base on one pair, split as the module docstring says."""
    chosen, rejected = pair.chosen, pair.rejected
    split = split_point(chosen, rejected)
    run = [token_logps(model, side.input_ids) for side in (chosen, rejected)]
    with model.disable_adapter():
        base = [token_logps(model, side.input_ids) for side in (chosen, rejected)]
    delta_c, delta_r = run[0] - base[0], run[1] - base[1]
    supervised = torch.tensor(chosen.labels[1:]) != -100
    shared = supervised.clone()
    shared[split:] = False
    after = supervised.clone()
    after[: split + 1] = False
    return {"shared": delta_c[shared].mean().item() if shared.any() else float("nan"),
            "chosen@split": delta_c[split].item(), "rejected@split": delta_r[split].item(),
            "wins@split": float(run[0][split] > run[1][split]),
            "after": delta_c[after].mean().item() if after.any() else float("nan"),
            "end@chosen": delta_c[supervised.nonzero()[-1, 0]].item()}


def measure(run_dir: str, data: str) -> dict:
    loaded = load(run_dir, dtype=torch.float32)
    options = EncodeOptions(max_length=loaded.run_info.get("max_length"))
    encoded, _ = encode_pairs(load_pairs([data]), loaded.tokenizer, options, loaded.system_prompt, "pairs", False)
    rows = [pair_changes(loaded.model, pair) for pair in encoded]
    return {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories trained as adapters")
    parser.add_argument("--data", required=True, help="held-out pairs")
    args = parser.parse_args()
    columns = ("shared", "chosen@split", "rejected@split", "wins@split", "after", "end@chosen")
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for run in args.runs:
        values = measure(run, args.data)
        print(f"| {run} | " + " | ".join(f"{values[c]:+.2f}" if c != "wins@split" else f"{values[c]:.2f}"
                                         for c in columns) + " |")


if __name__ == "__main__":
    main()
