"""Checkpoint serialisation without pickle, and prompt sets."""

from __future__ import annotations

import hashlib

import pytest
import torch

from learner.checkpoint import (
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from services.config import PromptConfig
from services.prompts import PromptSampler, prompt_list, prompt_set


def test_flatten_round_trip_keeps_int_keys_and_tensors():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 2)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}], "name": "x", "n": None}  # fmt: skip
    skeleton, tensors = flatten_state(state)
    back = unflatten_state(skeleton, tensors)
    assert list(back["state"].keys()) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == [0.9, 0.999] and back["name"] == "x" and back["n"] is None


def test_save_and_load_checkpoint(tmp_path):
    state = {"policy": {"w": torch.arange(4.0)}, "policy_version": 7, "gen": torch.Generator().get_state()}
    save_checkpoint(tmp_path, 1, state)
    save_checkpoint(tmp_path, 12, {**state, "policy_version": 8})
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "epoch_0012"
    loaded = load_checkpoint(newest)
    assert loaded["policy_version"] == 8 and torch.equal(loaded["policy"]["w"], torch.arange(4.0))
    assert torch.equal(loaded["gen"], state["gen"])


def test_learner_state_round_trip(tiny_train_config, tmp_path):
    from actors.sampler import Sampler
    from learner.learner import Learner
    from services.models import load_pipeline

    cfg = tiny_train_config(stat_tracking={"enabled": True, "min_count": 2})
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    sampler, learner = Sampler(cfg, pipeline=pipe), Learner(cfg, pipeline=pipe)
    batch = sampler.sample_scored()
    learner.train_epoch(batch)
    save_checkpoint(tmp_path, 0, learner.state_dict())
    # a fresh learner restored from disk continues exactly like the original
    other = Learner(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed + 5))
    other.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path)))
    assert other.policy_version == 1
    m1, m2 = learner.train_epoch(batch), other.train_epoch(batch)
    assert m1 == m2
    for (n, a), (_, b) in zip(learner.policy_weights().items(), other.policy_weights().items(), strict=True):
        assert torch.equal(a, b), n


# The DDPO reference implementation's lists (kvablack/ddpo-pytorch, ddpo_pytorch/assets/), written out here
# independently of configs/prompts/ so that a change to the data files fails a test.
REFERENCE_SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]  # fmt: skip
# sha256 of the first 398 lines of its imagenet_classes.txt, joined with "\n"
REFERENCE_IMAGENET_ANIMALS_SHA256 = "502198a6a0f7f97cc291bcc04010eb552d02ab37e6a6ebbb577dc9d6f999973c"


def test_paper_prompt_sets_equal_the_reference_line_for_line():
    assert list(prompt_set("simple_animals")) == REFERENCE_SIMPLE_ANIMALS
    animals = prompt_set("imagenet_animals")
    assert len(animals) == 398
    assert animals[0] == "tench, Tinca tinca" and animals[100] == "black swan, Cygnus atratus"
    assert animals[-1] == "puffer, pufferfish, blowfish, globefish"
    assert hashlib.sha256("\n".join(animals).encode()).hexdigest() == REFERENCE_IMAGENET_ANIMALS_SHA256
    clean = prompt_set("imagenet_animals_clean")
    assert len(clean) == 398 and clean[0] == "tench" and clean[-1] == "pufferfish"
    assert list(prompt_set("activities")) == ["washing the dishes", "riding a bike", "playing chess"]


def test_generated_prompt_sets():
    acts = prompt_list(PromptConfig(set="nouns_activities"))
    assert "a raccoon washing the dishes" in acts and "an ant riding a bike" in acts and len(acts) == 45 * 3
    counting = prompt_list(PromptConfig(set="counting", nouns=["mouse", "cat"]))
    assert counting[:3] == ["one mouse", "two mice", "three mice"] and "six cats" in counting


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"set": "animals"}, "prompts.set: unknown set 'animals'"),
        ({"set": "from_file"}, "prompts.path: required"),
        ({"set": "from_file", "path": "/nonexistent/prompts.txt"}, "prompts.path: file not found"),
        ({"set": "list", "items": []}, "prompts.items: must not be empty"),
    ],
)
def test_bad_prompt_config_is_refused_naming_the_field(fields, message):
    from services.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config({"prompts": fields})


def test_prompt_sampler_is_reproducible_and_resumable(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\na red cube\n\na blue ball\n")
    cfg = PromptConfig(set="from_file", path=str(f))
    a = PromptSampler(cfg, seed=3)
    a.sample(5)
    state = a.state_dict()
    b = PromptSampler(cfg, seed=99)
    b.load_state_dict(state)
    assert a.sample(10) == b.sample(10)
    assert set(PromptSampler(cfg, 0).sample(50)) == {"a red cube", "a blue ball"}
