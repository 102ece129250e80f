"""Held-out evaluation: fixed seeds, deterministic, independent of batch composition; `ddpo eval` on a run dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_lora_export import perturbed_lora_pipeline

from services.config import ConfigError, dump_config
from services.evaluation import EvalResult, checkpoint_dirs, evaluate, score_fns_for
from services.lora import save_diffusers_lora

EVAL = {
    "prompts": ["a fox", "a cow"],
    "num_per_prompt": 2,
    "seed": 5,
    "watch_rewards": ["jpeg_incompressibility"],
}


def _cfg(tiny_train_config, **evaluation):
    return tiny_train_config(sampling={"num_steps": 4}, evaluation={**EVAL, **evaluation})


def test_metrics_are_mean_and_population_std():
    result = EvalResult(
        epoch=3, prompts=["a"] * 4, seeds=[0, 1, 2, 3], images=[], scores={"r": [1.0, 2.0, 3.0, 4.0]}
    )
    # mean 2.5; deviations -1.5 -0.5 0.5 1.5 -> variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert result.metrics() == {"eval/r_mean": 2.5, "eval/r_std": pytest.approx(1.25**0.5)}
    assert result.to_json()["metrics"]["eval/r_mean"] == 2.5


def test_fixed_seeds_make_images_independent_of_the_other_prompts(tiny_sd_path, tiny_train_config):
    pipe = perturbed_lora_pipeline(tiny_sd_path)
    cfg = _cfg(tiny_train_config)
    both = evaluate(pipe, cfg, score_fns_for(cfg), epoch=0)
    assert both.prompts == ["a fox", "a fox", "a cow", "a cow"] and both.seeds == [5, 6, 5, 6]
    # two rewards, both scored on every image; incompressibility is minus compressibility (both are JPEG kB)
    assert list(both.scores) == ["jpeg_compressibility", "jpeg_incompressibility"]
    assert both.scores["jpeg_incompressibility"] == [-s for s in both.scores["jpeg_compressibility"]]
    assert set(both.metrics()) == {f"eval/{n}_{s}" for n in both.scores for s in ("mean", "std")}
    cow_only = evaluate(pipe, _cfg(tiny_train_config, prompts=["a cow"]), score_fns_for(cfg), epoch=0)
    for a, b in zip(both.images[2:], cow_only.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # different seeds give different images (the seeds are really used)
    assert not np.array_equal(np.asarray(both.images[0]), np.asarray(both.images[1]))


def test_ddpo_eval_of_the_same_checkpoint_twice_gives_identical_scores(
    tiny_sd_path, tiny_train_config, tmp_path
):
    from services.app.cli import main

    cfg = _cfg(tiny_train_config)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_diffusers_lora(
        perturbed_lora_pipeline(tiny_sd_path).unet, run / "checkpoints" / "epoch_0002" / "lora"
    )
    save_diffusers_lora(
        perturbed_lora_pipeline(tiny_sd_path, seed=9).unet, run / "checkpoints" / "epoch_0004" / "lora"
    )
    outputs = []
    for _ in range(2):
        main(["eval", str(run), "--checkpoint", "2"])
        outputs.append(json.loads((run / "eval" / "epoch_0002.json").read_text()))
    first, second = outputs
    assert first["epoch"] == 2 and first["seeds"] == [5, 6, 5, 6]
    assert first["scores"] == second["scores"] and first["metrics"] == second["metrics"]
    assert (run / "images" / "eval_epoch_0002.png").stat().st_size > 1000
    assert not (run / "eval" / "epoch_0004.json").exists()  # only the chosen checkpoint
    assert [p.name for p in checkpoint_dirs(run)] == ["epoch_0002", "epoch_0004"]  # the default: all of them
    main(["eval", str(run), "--checkpoint", "epoch_0004"])
    fourth = json.loads((run / "eval" / "epoch_0004.json").read_text())
    assert fourth["scores"] != first["scores"]  # another LoRA, other images


def test_http_rewards_go_through_the_reward_client(tiny_train_config):
    class FakeClient:
        def __init__(self):
            self.calls = []

        def score(self, name, images, prompts, metadata):
            self.calls.append((name, len(images), list(prompts)))
            return [1.5] * len(images), {}

    cfg = _cfg(tiny_train_config, watch_rewards=["aesthetic", "jpeg_compressibility"])
    with pytest.raises(ValueError, match="aesthetic"):
        score_fns_for(cfg)
    client = FakeClient()
    fns = score_fns_for(cfg, client)
    assert list(fns) == ["jpeg_compressibility", "aesthetic"]  # optimised first, no duplicates
    assert fns["aesthetic"](["img"], ["a fox"], [{}]) == ([1.5], {})
    assert client.calls == [("aesthetic", 1, ["a fox"])]


def test_empty_eval_prompts_is_a_config_error(tiny_train_config):
    from services.evaluation import eval_prompts_and_seeds

    with pytest.raises(ConfigError, match="evaluation.prompts"):
        eval_prompts_and_seeds(_cfg(tiny_train_config, prompts=[]))
