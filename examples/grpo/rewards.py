"""Rewards for examples/grpo: short, correct answers to "What is the capital of X?".

A reward function takes the prompts, the model's completions and every other column of the data
(here ``answer``) as lists, and returns one number per completion (TRL's convention).
"""

import re


def short_answer(prompts, completions, answer, **fields):
    """1 for the bare answer ("Paris."), less for every extra word (words of the answer / words of the reply:
    "The capital of France is Paris." gets 1/6), 0 when the answer is not in the reply."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        words = re.findall(r"\w+", completion)
        found = re.search(rf"\b{re.escape(expected)}\b", completion, re.IGNORECASE) is not None
        scores.append(min(1.0, len(expected.split()) / len(words)) if found and words else 0.0)
    return scores
