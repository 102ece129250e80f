"""The README's worked examples, "Add a reward" and "Add an objective", run as written: if the code they show stops
working with the project, these tests fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(section: str) -> str:
    """The first python code block under the README heading `### {section}`."""
    text = README.read_text()
    start = text.index(f"### {section}\n")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no python example under {section!r}"
    return block.group(1)


@pytest.fixture
def run_example():
    """exec a README example; undo what it registered afterwards."""
    from learner.objectives import OBJECTIVES
    from services.rewards import REWARDS

    before = (dict(REWARDS), dict(OBJECTIVES))
    yield lambda section: exec(compile(readme_example(section), f"README.md ({section})", "exec"), {})
    REWARDS.clear()
    REWARDS.update(before[0])
    OBJECTIVES.clear()
    OBJECTIVES.update(before[1])


def test_the_add_a_reward_example_trains_and_scores(run_example, tiny_train_config):
    from actors.sampler import Sampler
    from services.config import ConfigError, load_config
    from services.reward_client import Scorer

    run_example("Add a reward")
    cfg = tiny_train_config(reward={"name": "brightness"}, evaluation={"watch_rewards": ["brightness"]})
    white, black = Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")
    scores, info = Scorer(cfg.reward).score([white, black], ["a", "b"], [{}, {}])
    assert scores == [1.0, 0.0] and info["brightness"] == [1.0, 0.0]
    batch = Sampler(cfg).sample_scored()  # the sampling side scores a real batch with it
    assert all(0.0 <= t.reward <= 1.0 for t in batch) and "brightness" in batch[0].reward_info
    with pytest.raises(
        ConfigError, match="runs only in process"
    ):  # it has no server: http is refused by name
        load_config("quickstart", ["reward.name=brightness", "reward.mode=http"])


def test_the_add_an_objective_example_is_a_working_loss(run_example, tiny_train_config):
    from actors.sampler import Sampler
    from learner.learner import Learner
    from learner.objectives import OBJECTIVES

    run_example("Add an objective")
    objective = OBJECTIVES["ddpo_is_unclipped"]
    # by hand: r = [2, 0.5], A = [1, -1] -> -mean(A r) = -(2 - 0.5) / 2 = -0.75, no clipping at r = 2
    loss, stats = objective.loss(
        torch.log(torch.tensor([2.0, 0.5])), torch.zeros(2), torch.tensor([1.0, -1.0]), 0.2
    )
    assert loss.item() == pytest.approx(-0.75) and stats.clipfrac == 1.0
    # and the learner trains with it (the config takes a name of services/config.py's choices: set it directly)
    cfg = tiny_train_config()
    learner = Learner(cfg)
    learner.objective = objective
    metrics = learner.train_epoch(Sampler(cfg, pipeline=learner.pipe).sample_scored())
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
