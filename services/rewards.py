"""The reward registry: every reward declared once, with the reward servers it calls and, if it can run there, its
function in the sampling process.

Every reward has one signature, ``(images, prompts, metadata) -> (scores, info)``: images are RGB PIL images, scores
one float per image, info a dict of per-sample lists (JSON-serialisable). A reward is

- ``local``: computed in the sampling process (`reward.mode: local`), when it needs no model;
- ``remote``: over HTTP, an async function of a `RewardServers` (the client's `call(kind, request)`), used when
  `reward.mode: http`; the servers it calls are ``servers`` (kinds of `services.reward_api.SERVER_APIS`).
A reward has at least one of the two.

Add a reward by adding a row to `REWARDS` (README, "Add a reward").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image
from pydantic import BaseModel

from services.images import encode_image, jpeg_kb
from services.reward_api import (
    AnswerRequest,
    AnswerResponse,
    BertScoreResponse,
    ImagesPromptsRequest,
    ImagesRequest,
    JpegScoreResponse,
    ScoreResponse,
    SimilarityScoreResponse,
    TextPairsRequest,
)

Scores = tuple[list[float], dict[str, list[Any]]]
TERM_PREFIX = "reward/"  # with several reward terms, reward_info["reward/<name>"] holds each term's raw score
Images = Sequence[Image.Image]
Metadata = Sequence[dict[str, Any]]
RewardFn = Callable[[Images, Sequence[str], Metadata], Scores]

# The paper's prompt alignment: LLaVA describes the image, BERTScore recall against "The image contains {prompt}".
ALIGNMENT_QUESTION = "Answer concisely: what is going on in this image?"
ALIGNMENT_REFERENCE = "The image contains {prompt}"
ALIGNMENT_MAX_NEW_TOKENS = 32
# PNG to the jpeg server: lossless, so the HTTP reward equals the local one (a JPEG upload would be re-compressed)
JPEG_SERVER_FORMAT = "PNG"


class RewardServers(Protocol):
    """What a remote reward needs of the HTTP client: one typed call to a replica of a reward-server kind."""

    async def call(self, kind: str, request: BaseModel) -> Any: ...


RemoteFn = Callable[[RewardServers, Images, Sequence[str], Metadata], Awaitable[Scores]]


@dataclass(frozen=True)
class Reward:
    name: str
    about: str
    servers: tuple[str, ...] = ()  # reward-server kinds `remote` calls
    remote: RemoteFn | None = None  # over HTTP (reward.mode: http); None = only in process
    # in the sampling process (reward.mode: local); None = only through the servers
    local: RewardFn | None = None


async def _encoded(images: Images, fmt: str) -> list[str]:
    # image encoding is CPU-bound: off the event loop, so that other requests keep flowing
    return await asyncio.to_thread(lambda: [encode_image(im, fmt=fmt, quality=95) for im in images])


# ---- JPEG compressibility and incompressibility -------------------------------------------------------------------
def jpeg_compressibility(images: Images, prompts: Sequence[str], metadata: Metadata) -> Scores:
    """Minus the kB of a quality-95 JPEG: smaller files score higher."""
    kb = [jpeg_kb(im) for im in images]
    return [-k for k in kb], {"jpeg_kb": kb}


def jpeg_incompressibility(images: Images, prompts: Sequence[str], metadata: Metadata) -> Scores:
    """The kB of a quality-95 JPEG: larger files score higher."""
    kb = [jpeg_kb(im) for im in images]
    return list(kb), {"jpeg_kb": kb}


async def _remote_jpeg_kb(servers: RewardServers, images: Images) -> list[float]:
    reply: JpegScoreResponse = await servers.call(
        "jpeg", ImagesRequest(images=await _encoded(images, JPEG_SERVER_FORMAT))
    )
    return [float(kb) for kb in reply.jpeg_kb]


async def remote_jpeg_compressibility(servers: RewardServers, images: Images, prompts, metadata) -> Scores:
    kb = await _remote_jpeg_kb(servers, images)
    return [-k for k in kb], {"jpeg_kb": kb}


async def remote_jpeg_incompressibility(servers: RewardServers, images: Images, prompts, metadata) -> Scores:
    kb = await _remote_jpeg_kb(servers, images)
    return list(kb), {"jpeg_kb": kb}


# ---- aesthetic ------------------------------------------------------------------------------------------------------
async def remote_aesthetic(servers: RewardServers, images: Images, prompts, metadata) -> Scores:
    """The LAION aesthetic predictor's score."""
    reply: ScoreResponse = await servers.call(
        "aesthetic", ImagesRequest(images=await _encoded(images, "JPEG"))
    )
    scores = [float(s) for s in reply.scores]
    return scores, {"aesthetic": list(scores)}


# ---- image-prompt similarity: PickScore and CLIPScore ----------------------------------------------------------------
async def _remote_similarity(
    kind: str, servers: RewardServers, images: Images, prompts: Sequence[str]
) -> Scores:
    """A CLIP similarity server's score of each image for its prompt; info: the score and the raw cosine."""
    request = ImagesPromptsRequest(images=await _encoded(images, "JPEG"), prompts=list(prompts))
    reply: SimilarityScoreResponse = await servers.call(kind, request)
    scores = [float(s) for s in reply.scores]
    return scores, {kind: list(scores), f"{kind}_cosine": [float(c) for c in reply.cosine]}


async def remote_pickscore(
    servers: RewardServers, images: Images, prompts: Sequence[str], metadata
) -> Scores:
    """PickScore: exp(logit_scale) * cos of the PickScore CLIP's image and prompt embeddings."""
    return await _remote_similarity("pickscore", servers, images, prompts)


async def remote_clipscore(
    servers: RewardServers, images: Images, prompts: Sequence[str], metadata
) -> Scores:
    """CLIPScore: 2.5 * max(cos, 0) of CLIP's image and prompt embeddings (Hessel et al. 2021)."""
    return await _remote_similarity("clipscore", servers, images, prompts)


# ---- prompt alignment -----------------------------------------------------------------------------------------------
async def remote_prompt_alignment(
    servers: RewardServers, images: Images, prompts: Sequence[str], metadata
) -> Scores:
    """BERTScore recall of LLaVA's description against "The image contains {prompt}" (the paper's reward)."""
    encoded = await _encoded(images, "JPEG")
    request = AnswerRequest(
        images=encoded,
        questions=[[ALIGNMENT_QUESTION] for _ in encoded],
        max_new_tokens=ALIGNMENT_MAX_NEW_TOKENS,
    )
    answers: AnswerResponse = await servers.call("llava", request)
    candidates = [str(a[0]) if a else "" for a in answers.answers]
    references = [ALIGNMENT_REFERENCE.format(prompt=p) for p in prompts]
    bs: BertScoreResponse = await servers.call(
        "bertscore", TextPairsRequest(candidates=candidates, references=references)
    )
    return [float(x) for x in bs.recall], {
        "answers": candidates,
        "bertscore_precision": list(bs.precision),
        "bertscore_f1": list(bs.f1),
    }


REWARDS: dict[str, Reward] = {
    r.name: r
    for r in (
        Reward("jpeg_compressibility", "-kB of a quality-95 JPEG", ("jpeg",), remote=remote_jpeg_compressibility,
               local=jpeg_compressibility),
        Reward("jpeg_incompressibility", "+kB of a quality-95 JPEG", ("jpeg",), remote=remote_jpeg_incompressibility,
               local=jpeg_incompressibility),
        Reward("aesthetic", "LAION aesthetic predictor on CLIP ViT-L/14", ("aesthetic",), remote=remote_aesthetic),
        Reward("prompt_alignment", "BERTScore recall of a LLaVA description against the prompt",
               ("llava", "bertscore"), remote=remote_prompt_alignment),
        Reward("pickscore", "PickScore (human preference) of the image for its prompt", ("pickscore",),
               remote=remote_pickscore),
        Reward("clipscore", "CLIPScore, 2.5 * max(cos, 0), of the image and its prompt", ("clipscore",),
               remote=remote_clipscore),
    )
}  # fmt: skip


def get_reward(name: str) -> Reward:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}") from None


def is_local(name: str) -> bool:
    """Whether the reward can be computed in the sampling process (no reward server needed)."""
    return get_reward(name).local is not None
