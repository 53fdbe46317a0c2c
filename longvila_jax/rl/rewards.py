"""Rewards of sampled answers: named functions, weighted and summed.

An answer is scored against its sample (`question`, `options`, `answer`: the JSONL row of
eval-mcq's format). The built-in functions:

- `mcq_accuracy`: 1 when the chosen option is the correct one, read as eval-mcq's "r1"
  style reads it (`eval.mcq.extract_tagged_choice`: the last `<answer>` span's letter or
  option text, or a bare final letter; several letters choose nothing).
- `format`: 1 when the whole answer is `<think>...</think>` then `<answer>...</answer>`.

A user's function is named by import path, `module:function`, and called the same way,
`function(answer: str, sample: dict) -> float`.
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable, Mapping, Sequence

from longvila_jax.eval.mcq import extract_tagged_choice, lettered_options

RewardFn = Callable[[str, Mapping], float]

_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def option_letters(sample: Mapping) -> str:
    """The letters of `sample`'s options: 'ABCD' for four (at least 'AB')."""
    return string.ascii_uppercase[: max(2, len(sample.get("options") or ()))]


def option_texts(sample: Mapping) -> tuple[str, ...]:
    """`sample`'s options without their letters ("green" for "B. green"); none without options."""
    options = list(sample.get("options") or ())
    return tuple(option[3:] for option in lettered_options(options, "sample")) if options else ()


def mcq_accuracy(answer: str, sample: Mapping) -> float:
    gold = str(sample["answer"]).strip().strip("().").upper()
    return float(extract_tagged_choice(answer, option_letters(sample), option_texts(sample))
                 == gold)


def format_reward(answer: str, sample: Mapping) -> float:
    return float(_FORMAT.fullmatch(answer) is not None)


BUILT_IN: dict[str, RewardFn] = {"mcq_accuracy": mcq_accuracy, "format": format_reward}


def reward_function(name: str) -> RewardFn:
    """A built-in reward by name, or a user's by `module:function`."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, sep, attribute = name.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"reward {name!r}: not one of {sorted(BUILT_IN)} nor module:function")
    try:
        function = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {name!r}: cannot import it ({err})") from None
    if not callable(function):
        raise ValueError(f"reward {name!r}: {module}.{attribute} is not callable")
    return function


def parse_weights(text: str) -> dict[str, float]:
    """`"mcq_accuracy=0.9,format=0.1"` -> `{"mcq_accuracy": 0.9, "format": 0.1}`."""
    weights = {}
    for item in (t.strip() for t in text.split(",")):
        name, sep, value = item.rpartition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"rewards {text!r}: {item!r} is not name=weight")
    return weights


class Rewards:
    """Weighted sum of named reward functions; `scores` keeps each one's value too."""

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise ValueError("rewards: no reward functions given")
        self.functions = {name: reward_function(name) for name in weights}
        self.weights = {name: float(w) for name, w in weights.items()}

    def scores(self, answers: Sequence[str], samples: Sequence[Mapping]) -> dict[str, list]:
        """Per function, its value for each (answer, sample); `total`, the weighted sum."""
        out = {name: [float(fn(a, s)) for a, s in zip(answers, samples, strict=True)]
               for name, fn in self.functions.items()}
        out["total"] = [sum(self.weights[name] * out[name][i] for name in self.functions)
                        for i in range(len(answers))]
        return out
