"""Prompt sets of the paper's experiments, as data files a user can read, and a seeded prompt sampler.

`configs/prompts/NAME.txt` holds one prompt per line; `prompts.set: NAME` samples uniformly from it. Shipped:

    simple_animals.txt         the 45 animals of the DDPO reference implementation (kvablack/ddpo-pytorch), in order
    imagenet_animals.txt       ImageNet-1k classes 0-397 (the animals) exactly as the reference lists them: whole
                               synonym lines such as "tench, Tinca tinca"
    imagenet_animals_clean.txt the same classes with one clean name each ("tench")
    activities.txt             the prompt-alignment activities ("riding a bike", ...)

Generated sets: `nouns_activities` ("a cat riding a bike": prompts.nouns x prompts.activities, default the two
files above), `counting` ("three dogs"), `from_file` (prompts.path) and `list` (prompts.items).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from services.config import CONFIG_DIR, PromptConfig

PROMPTS_DIR = CONFIG_DIR / "prompts"
GENERATED_SETS = ("nouns_activities", "counting", "from_file", "list")

_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six"]
_IRREGULAR_PLURALS = {"sheep": "sheep", "deer": "deer", "mouse": "mice", "goose": "geese", "fly": "flies",
                      "butterfly": "butterflies", "fish": "fish", "octopus": "octopuses", "fox": "foxes",
                      "wolf": "wolves", "turkey": "turkeys"}  # fmt: skip


def file_sets() -> list[str]:
    """Names of the prompt sets shipped as configs/prompts/NAME.txt."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


@cache
def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with '#' are skipped; whitespace at the ends trimmed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    prompts = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not prompts:
        raise ValueError(f"prompt file {path}: no prompts in it")
    return prompts


def prompt_set(name: str) -> tuple[str, ...]:
    """A shipped prompt set by name (configs/prompts/NAME.txt)."""
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.is_file():
        raise ValueError(
            f"prompts.set: unknown set {name!r}; known: {', '.join(file_sets() + list(GENERATED_SETS))}"
        )
    return read_prompt_file(path)


def _plural(noun: str) -> str:
    return _IRREGULAR_PLURALS.get(noun, noun + "s")


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def prompt_list(cfg: PromptConfig) -> list[str]:
    """All prompts of the configured set (sampling is uniform over this list)."""
    if cfg.set == "nouns_activities":
        nouns = cfg.nouns or prompt_set("simple_animals")
        activities = cfg.activities or prompt_set("activities")
        return [f"{_with_article(n)} {a}" for n in nouns for a in activities]
    if cfg.set == "counting":
        nouns = cfg.nouns or prompt_set("simple_animals")
        return [f"{_NUMBER_WORDS[k - 1]} {n if k == 1 else _plural(n)}" for n in nouns for k in range(1, 7)]
    if cfg.set == "from_file":
        if not cfg.path:
            raise ValueError("prompts.path is required for prompts.set=from_file")
        return list(read_prompt_file(cfg.path))
    if cfg.set == "list":
        if not cfg.items:
            raise ValueError("prompts.items must not be empty for prompts.set=list")
        return list(cfg.items)
    return list(prompt_set(cfg.set))


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
