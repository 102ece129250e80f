"""Config loading: presets, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from services.config import CONFIG_DIR, ConfigError, load_config


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads_and_its_prompts_resolve(preset):
    """load_config validates a preset's fields; its prompt set is read only when a run starts, and its held-out
    prompts when it evaluates: both must resolve, and the held-out prompts are never trained on."""
    from services.evaluation import eval_prompts_and_seeds
    from services.prompts import prompt_list

    cfg = load_config(preset)
    prompts = prompt_list(cfg.prompts)
    assert prompts and all(p.strip() for p in prompts)
    if cfg.evaluation.every:
        held_out, _ = eval_prompts_and_seeds(cfg)
        assert held_out and not set(held_out) & set(prompts)


def test_paper_presets_keep_reference_values():
    for preset in ("compressibility", "incompressibility", "aesthetic", "prompt_alignment"):
        cfg = load_config(preset)
        assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        assert (cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale) == (50, 1.0, 5.0)
        assert (cfg.training.learning_rate, cfg.training.clip_range, cfg.training.adv_clip_max) == (
            3e-4,
            1e-4,
            5,
        )
        assert cfg.samples_per_epoch == 256 and cfg.lora.rank == 4
        # GPU default: bfloat16 base (no loss scaling needed), exact float32 trajectories
        assert (cfg.model.dtype, cfg.cluster.latent_dtype) == ("bfloat16", "float32")


def test_set_overrides_parse_yaml_values():
    cfg = load_config("quickstart", ["training.learning_rate=1e-3", "lora.target_modules=[to_q, to_v]",
                                     "training.cfg=false", "sampling.guidance_scale=1",
                                     "prompts.items=[a cow]"])  # fmt: skip
    assert cfg.training.learning_rate == 1e-3
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.training.cfg is False and cfg.prompts.items == ["a cow"]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"training\.learnin_rate: unknown key"):
        load_config("quickstart", ["training.learnin_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"bogus: unknown key"):
        load_config("quickstart", ["bogus=1"])


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"training\.objective"):
        load_config("quickstart", ["training.objective=ppo"])
    with pytest.raises(ConfigError, match=r"sampling\.eta"):
        load_config("quickstart", ["sampling.eta=0"])
    with pytest.raises(ConfigError, match=r"sampling\.num_steps"):
        load_config("quickstart", ["sampling.num_steps=many"])


def test_batch_divisibility_is_checked():
    with pytest.raises(ConfigError, match="divisible by training.batch_size"):
        load_config("quickstart", ["training.batch_size=5"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config("quickstart", ["training.gradient_accumulation_steps=3"])


def test_bad_preset_and_bad_set_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("quickstart", ["training.learning_rate"])
    with pytest.raises(ConfigError, match="training.learning_rate is not a section"):
        load_config("quickstart", ["training.learning_rate.x=1"])


def test_every_field_has_a_doc_line():
    from services.config import TrainConfig

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no doc line"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(TrainConfig)


def test_ddpo_sf_off_policy_is_refused_naming_the_fields():
    # quickstart: 32 samples per epoch, micro-batches of 8; with no accumulation -> 4 optimizer steps per epoch
    sf = ["training.objective=ddpo_sf"]
    with pytest.raises(
        ConfigError, match=r"ddpo_sf.*one optimizer step per epoch.*gradient_accumulation_steps=4"
    ):
        load_config("quickstart", [*sf, "training.gradient_accumulation_steps=1"])
    with pytest.raises(ConfigError, match=r"ddpo_sf.*one optimizer step per epoch"):
        load_config("quickstart", [*sf, "training.num_inner_epochs=2"])
    with pytest.raises(ConfigError, match=r"ddpo_sf.*cluster\.max_policy_lag must be 0"):
        load_config("quickstart", [*sf, "cluster.max_policy_lag=1"])
    cfg = load_config("quickstart", sf)  # one update per epoch, synchronous: on-policy
    assert cfg.updates_per_epoch == 1


def test_objective_choices_are_the_objective_table():
    import typing

    from learner.objectives import OBJECTIVES
    from services.config import TrainingConfig

    choices = typing.get_args(TrainingConfig.model_fields["objective"].annotation)
    assert set(choices) == set(OBJECTIVES)


def test_diffusers_name_num_train_timesteps_is_refused_by_name():
    with pytest.raises(
        ConfigError, match=r"training\.num_train_timesteps: not a config key.*timestep_fraction"
    ):
        load_config("quickstart", ["training.num_train_timesteps=5"])
    cfg = load_config("quickstart", ["training.timestep_fraction=0.5"])
    assert cfg.trained_steps_per_sample == 5  # 10 steps x 0.5
