"""Checkpoint serialisation without pickle, and prompt sets."""

from __future__ import annotations

import torch

from learner.checkpoint import (
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from services.config import PromptConfig
from services.prompts import SIMPLE_ANIMALS, PromptSampler, imagenet_animals, prompt_list


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


def test_prompt_sets():
    animals = imagenet_animals()
    assert len(animals) == 398 and animals[0] == "tench" and animals[-1] == "pufferfish"
    assert len(SIMPLE_ANIMALS) == 45 == len(set(SIMPLE_ANIMALS))
    acts = prompt_list(PromptConfig(set="nouns_activities"))
    assert "a raccoon washing the dishes" in acts and "an owl riding a bike" in acts and len(acts) == 45 * 3
    counting = prompt_list(PromptConfig(set="counting", nouns=["mouse", "cat"]))
    assert counting[:3] == ["one mouse", "two mice", "three mice"] and "six cats" in counting


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
