"""Beyond the paper: groups (GRPO), the KL to the base model, several reward terms, EMA, the stochastic window,
CFG-free training and the reward-hacking guard, each checked against an independent computation or an event."""

from __future__ import annotations

import json
import math
import uuid

import pytest
import redis
import torch
from reward_server_utils import ServerProcess

from actors.sampler import Sampler
from learner.learner import Learner
from learner.loop import StreamSource
from learner.objectives import group_advantages
from services.config import build_config
from services.diffusion import encode_prompts, gaussian_kl, sample_trajectory, step_log_prob
from services.images import jpeg_kb, tensor_to_pil
from services.models import load_pipeline, trainable_parameters
from services.reward_client import Scorer
from services.streams import TrajectoryStream, delete_run_keys
from services.trajectory import ScoredTrajectory, decode_trajectory, encode_trajectory, split_scored


def make(cfg):
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    return Sampler(cfg, pipeline=pipe), Learner(cfg, pipeline=pipe)


def one_update_per_epoch(cfg) -> None:
    cfg.training.gradient_accumulation_steps = cfg.samples_per_epoch // cfg.training.batch_size


# ---- groups ---------------------------------------------------------------------------------------------------------
def test_group_advantages_hand_worked():
    groups, rewards = ["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 2.0, 2.0])
    adv, flat = group_advantages(groups, rewards)
    # group a: mean 2, std 1 -> -1, +1; group b: all equal -> 0 (and counted as a zero-std group)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]), rtol=0, atol=1e-5)
    assert flat == 0.5
    adv, _ = group_advantages(groups, rewards, global_std=True)  # the batch's std: sqrt(0.5)
    s = math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]), rtol=0, atol=1e-5)


def test_groups_are_sampled_together_and_travel_with_their_id(tiny_train_config):
    cfg = tiny_train_config(sampling={"group_size": 2}, stat_tracking={"mode": "group"})
    sampler, learner = make(cfg)
    batch = sampler.sample_scored()
    assert [t.prompt for t in batch][::2] == [t.prompt for t in batch][1::2]
    ids = [t.group_id for t in batch]
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2] and all(ids)
    assert decode_trajectory(encode_trajectory(batch[0])).group_id == ids[0]
    one_update_per_epoch(cfg)
    metrics = learner.train_epoch(batch)
    assert 0.0 <= metrics["zero_std_group_frac"] <= 1.0
    # the learner's advantages are the groups' (the same computation, by hand)
    adv = learner.compute_advantages([t.prompt for t in batch], torch.tensor([t.reward for t in batch]), ids)
    torch.testing.assert_close(
        adv, group_advantages(ids, torch.tensor([t.reward for t in batch]))[0].clamp(-5, 5)
    )


def _traj(i: int, group: str, version: int = 0) -> ScoredTrajectory:
    return ScoredTrajectory(latents=torch.zeros(3, 4, 2, 2), log_probs=torch.zeros(2), timesteps=torch.arange(2),
                            prompt="p", reward=float(i), policy_version=version, trajectory_id=f"t{i}",
                            group_id=group)  # fmt: skip


def test_an_epoch_never_holds_part_of_a_group(tiny_train_config):
    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    run_id = f"test-{uuid.uuid4().hex}"
    cfg = tiny_train_config(sampling={"group_size": 2, "batch_size": 4}, stat_tracking={"mode": "group"})
    stream = TrajectoryStream(client, run_id)
    try:
        source = StreamSource(cfg, client, run_id, stream)
        source.open_version(0)
        # group a arrives whole, group b's second member only after group c: the epoch of 4 takes a and c
        stream.add_many([_traj(0, "a"), _traj(1, "a"), _traj(2, "b"), _traj(3, "c"), _traj(4, "c")])
        got = source.collect(4, version=0)
        assert sorted(t.trajectory_id for t in got.batch) == ["t0", "t1", "t3", "t4"]
        assert "t2" not in [t.trajectory_id for t in got.batch]
        stream.add_many([_traj(5, "b"), _traj(6, "d"), _traj(7, "d")])
        got = source.collect(4, version=0)  # b is completed in the next epoch
        assert sorted(t.trajectory_id for t in got.batch) == ["t2", "t5", "t6", "t7"]
    finally:
        delete_run_keys(client, run_id)
        client.close()


# ---- KL to the base model -------------------------------------------------------------------------------------------
def test_gaussian_kl_hand_worked():
    mean = torch.tensor([[[0.3, -0.1], [0.0, 0.2]]])  # [1, 2, 2]
    ref = torch.zeros_like(mean)
    # mean over dims of d^2 / (2 sigma^2): (0.09 + 0.01 + 0 + 0.04) / 4 / (2 * 0.25) = 0.07
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor(0.5)), torch.tensor([0.07]))


def test_kl_is_zero_before_the_first_update(tiny_train_config):
    cfg = tiny_train_config(training={"kl_coef": 0.1})
    sampler, learner = make(cfg)
    batch = sampler.sample_scored()
    # before any update the LoRA is the identity (B = 0): the policy is the base model
    embeds = encode_prompts(learner.pipe, [t.prompt for t in batch])
    latents = torch.stack([t.latents for t in batch])
    _, kl = step_log_prob(learner.unet, learner.scheduler, latents[:, 0], latents[:, 1],
                          torch.stack([t.timesteps[0] for t in batch]), embeds,
                          learner._negative_embeds.expand_as(embeds), cfg.sampling.guidance_scale, cfg.sampling.eta,
                          reference=learner.reference)  # fmt: skip
    assert torch.equal(kl, torch.zeros_like(kl))
    metrics = learner.train_epoch(batch)
    assert metrics["kl_to_base"] > 0  # the second optimizer step of the epoch starts away from the base


@pytest.mark.slow
def test_on_the_quickstart_a_large_beta_keeps_the_kl_well_below_beta_zeros(tmp_path, tiny_sd_path):
    from services.app.driver import run_local

    kl = {}
    for beta in (0.0, 100.0):
        tree = {**_quickstart_tree(tiny_sd_path), "num_epochs": 5, "evaluation": {"every": 0}}
        tree["training"] = {**tree["training"], "kl_coef": beta}
        tree["logging"] = {"kl_to_base": True, "images_per_epoch": 0, "tensorboard": False}
        rows = run_local(build_config(tree), tmp_path / f"beta{beta}", progress=False)
        kl[beta] = sum(r["kl_to_base"] for r in rows[1:]) / len(
            rows[1:]
        )  # epoch 0 trains from the base: KL 0
    assert kl[0.0] > 0 and kl[100.0] < 0.2 * kl[0.0], kl


# ---- several rewards -------------------------------------------------------------------------------------------------
def test_terms_are_normalised_separately_then_weighted(tiny_train_config):
    terms = [
        {"name": "jpeg_compressibility", "weight": 1.0},
        {"name": "jpeg_incompressibility", "weight": 0.25},
    ]
    cfg = tiny_train_config(reward={"terms": terms})
    sampler, learner = make(cfg)
    batch = sampler.sample_scored()
    a = torch.tensor([t.reward_info["reward/jpeg_compressibility"] for t in batch])
    b = torch.tensor([t.reward_info["reward/jpeg_incompressibility"] for t in batch])
    torch.testing.assert_close(torch.tensor([t.reward for t in batch]), a + 0.25 * b)
    adv = learner.compute_advantages([t.prompt for t in batch], torch.tensor([t.reward for t in batch]),
                                     term_rewards={"jpeg_compressibility": a, "jpeg_incompressibility": b})  # fmt: skip

    def z(x):
        x = x.double()
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    torch.testing.assert_close(adv, (z(a) + 0.25 * z(b)).float().clamp(-5, 5))
    metrics = learner.train_epoch(batch)
    assert metrics["loss"] is not None


def test_a_local_and_an_http_term_together(tiny_train_config, tmp_path):
    server = ServerProcess("jpeg", log_dir=tmp_path).wait_ready()
    try:
        terms = [{"name": "jpeg_compressibility", "weight": 1.0, "mode": "local"},
                 {"name": "jpeg_incompressibility", "weight": 2.0, "mode": "http"}]  # fmt: skip
        cfg = tiny_train_config(reward={"terms": terms, "servers": {"jpeg": {"urls": [server.url]}}})
        scorer = Scorer(cfg.reward, {"jpeg": [server.url]})
        sampler = Sampler(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=0), scorer=scorer)
        traj = sampler.sample()
        scores, info = sampler.score(traj)
        kb = torch.tensor([jpeg_kb(im) for im in tensor_to_pil(traj.images)])
        torch.testing.assert_close(scores, (-kb + 2.0 * kb).float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            torch.tensor(info["reward/jpeg_incompressibility"]), kb.float(), rtol=0, atol=1e-4
        )
        scorer.close()
    finally:
        server.stop()


# ---- EMA ------------------------------------------------------------------------------------------------------------
def test_ema_follows_the_weights_and_is_swapped_in_and_out(tiny_train_config, tmp_path):
    cfg = tiny_train_config(training={"ema_decay": 0.75, "learning_rate": 1e-2})
    one_update_per_epoch(cfg)
    sampler, learner = make(cfg)
    before = [p.detach().clone() for p in trainable_parameters(learner.unet)]
    learner.train_epoch(sampler.sample_scored())
    after = [p.detach().clone() for p in trainable_parameters(learner.unet)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    for avg, b, a in zip(learner.ema, before, after, strict=True):
        torch.testing.assert_close(avg, 0.75 * b + 0.25 * a)
    with learner.ema_weights() as swapped:
        assert swapped
        for p, avg in zip(trainable_parameters(learner.unet), learner.ema, strict=True):
            assert torch.equal(p, avg)
    for p, a in zip(trainable_parameters(learner.unet), after, strict=True):
        assert torch.equal(p, a)
    state = learner.state_dict()
    other = Learner(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed))
    other.load_state_dict(state)
    for x, y in zip(other.ema, learner.ema, strict=True):
        assert torch.equal(x, y)


# ---- the stochastic window and CFG-free training: on-policy ratio exactly 1 ------------------------------------------
def test_window_records_only_its_steps_and_the_rest_is_exact_ddim(tiny_train_config):
    cfg = tiny_train_config(sampling={"sde_window": [2, 5]})
    pipe = load_pipeline(cfg.model, cfg.lora, seed=0)
    traj = sample_trajectory(pipe, ["a cat", "a dog"], num_steps=8, generator=torch.Generator().manual_seed(1),
                             sde_window=[2, 5])  # fmt: skip
    assert traj.latents.shape[1] == 4 and traj.log_probs.shape == (2, 3)
    assert torch.equal(traj.timesteps, pipe.scheduler.timesteps[2:5].long())
    assert traj.final_latents is not None
    # eta 0 everywhere (a window of nothing stochastic is not allowed, so compare with eta=0 sampling): the steps
    # before the window are exact DDIM, so the window's first latent equals deterministic sampling's
    det = sample_trajectory(
        pipe, ["a cat", "a dog"], num_steps=8, eta=0.0, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(traj.latents[:, 0], det.latents[:, 2], rtol=0, atol=0)
    scored = split_scored(traj, torch.zeros(2), {}, 0)
    assert torch.equal(
        decode_trajectory(encode_trajectory(scored[0], torch.float32)).x0, traj.final_latents[0]
    )


@pytest.mark.parametrize(
    "sections",
    [
        {"sampling": {"sde_window": [2, 5]}},
        {"sampling": {"guidance_scale": 1.0}, "training": {"cfg": False}},
    ],
    ids=["window", "cfg-free"],
)
def test_on_policy_ratio_is_exactly_one(tiny_train_config, sections):
    cfg = tiny_train_config(**sections)
    one_update_per_epoch(cfg)
    sampler, learner = make(cfg)
    batch = sampler.sample_scored()
    assert batch[0].log_probs.shape[0] == cfg.sampling.window_steps
    metrics = learner.train_epoch(batch)
    assert metrics["ratio_first_step"] == 1.0 and metrics["clipfrac"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [{"sampling": {"sde_window": [2, 5]}}, {"sampling": {"guidance_scale": 1.0}, "training": {"cfg": False}}],
    ids=["window-3-steps", "cfg-free"],
)
def test_the_quickstart_learns(tmp_path, tiny_sd_path, overrides):
    """The quickstart's reward-rise check (last 3 epochs' mean >= first 3's + 2 per-sample stds), in one process."""
    from services.app.driver import run_local

    tree = {**_quickstart_tree(tiny_sd_path), "num_epochs": 12, "evaluation": {"every": 0}}
    for section, values in overrides.items():
        tree[section] = {**tree[section], **values}
    tree["logging"] = {"images_per_epoch": 0, "tensorboard": False}
    rows = run_local(build_config(tree), tmp_path, progress=False)
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    first_std = sum(r["reward_std"] for r in rows[:3]) / 3
    assert last - first >= 2 * first_std, (first, last, first_std)


# ---- the reward-hacking guard ---------------------------------------------------------------------------------------
def test_guard_stops_the_run_with_a_checkpoint_and_says_why(tmp_path, tiny_sd_path):
    from services.app.driver import run_local

    tree = _quickstart_tree(tiny_sd_path)
    # half the quickstart's epoch (16 samples, one optimizer step of 8 x 2): it still trips within a few epochs
    tree["sampling"] = {**tree["sampling"], "num_batches_per_epoch": 1}
    tree["training"] = {**tree["training"], "ema_decay": 0.5, "gradient_accumulation_steps": 2}
    cfg = build_config({
        **tree, "num_epochs": 8, "save_every": 100,
        "evaluation": {"every": 1, "prompts": ["a horse"], "num_per_prompt": 2,
                       "watch_rewards": ["jpeg_incompressibility"],
                       "guard": {"reward": "jpeg_incompressibility", "max_drop": 0.01, "action": "stop"}},
    })  # fmt: skip
    rows = run_local(cfg, tmp_path, progress=False)
    events = [json.loads(line) for line in (tmp_path / "guard.jsonl").read_text().splitlines()]
    assert len(events) == 1 and events[0]["drop"] > 0.01
    stop = events[0]["epoch"]
    assert len(rows) == stop + 1 < 8  # stopped at the epoch that tripped it
    ckpt = tmp_path / "checkpoints" / f"epoch_{stop:04d}"
    assert ckpt.is_dir()
    assert "Reward-hacking guard" in (tmp_path / "report.html").read_text()
    assert all(r.get("eval/uses_ema") == 1.0 for r in rows)  # the held-out evaluation ran on the EMA
    # the EMA is exported in the diffusers format next to the LoRA: the stock pipeline loads both, and they differ
    from diffusers import StableDiffusionPipeline

    outputs = {}
    for name in ("lora", "lora_ema"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
        pipe.load_lora_weights(str(ckpt / name))
        out = pipe(
            ["a horse"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
        )
        outputs[name] = out.images
    assert not torch.allclose(outputs["lora"], outputs["lora_ema"])


def _quickstart_tree(tiny_sd_path: str) -> dict:
    """The quickstart preset in one process, on the session's tiny model."""
    import yaml

    from services.config import CONFIG_DIR

    tree = yaml.safe_load((CONFIG_DIR / "quickstart.yaml").read_text())
    tree["cluster"] = {"in_process": True, "torch_threads": 1}
    tree["model"].update(pretrained=tiny_sd_path, write_tiny_if_missing=False)
    return tree
