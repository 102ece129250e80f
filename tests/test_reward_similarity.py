"""The PickScore and CLIPScore reward servers on loopback (threads of the test process:
reward_server_utils.ServerThread) with the tiny CLIPs that `ddpo tiny-models` writes (OUT/pickscore, OUT/clipscore),
checked against transformers' own CLIPModel forward; and the `pickscore` and `clipscore` rewards of the registry
through the HTTP client."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from reward_server_utils import ServerThread, noise_image, png_b64, start_servers

from reward_servers.clip_similarity import (
    CLIPSCORE_MODEL,
    PICKSCORE_MODEL,
    PICKSCORE_PROCESSOR,
    ClipScoreSettings,
    PickScoreSettings,
)
from services.config import TrainConfig
from services.images import encode_image
from services.reward_client import RewardClient
from services.rewards import REWARDS

KINDS = ("pickscore", "clipscore")
# Prompts repeat (several images per prompt, as in a sampled batch); one is longer than the 77 tokens CLIP takes.
PROMPTS = [
    "a cat",
    "a dog riding a bike",
    "a cat",
    "an owl in the snow",
    "a very long prompt " * 10,
    "a horse",
]
# Noise and two flat colours: with the tiny clipscore CLIP, some pairs have a negative cosine (red with the long
# prompt) and some a positive one, so that CLIPScore's clamp at 0 is exercised.
IMAGES = [noise_image(i, (48 + 8 * i, 40)) for i in range(3)]
IMAGES += [Image.new("RGB", (40, 40), "blue"), Image.new("RGB", (40, 56), "red"), noise_image(5, (88, 40))]


@pytest.fixture(scope="module")
def urls(tiny_models: Path) -> Iterator[dict[str, str]]:
    """Both servers on loopback with the session's tiny CLIPs, started together."""
    servers = {
        kind: ServerThread(
            kind,
            *("--model", str(tiny_models / kind), "--max-items", "8", "--max-wait-ms", "20"),
        )
        for kind in KINDS
    }
    try:
        start_servers(*servers.values())
        yield {kind: s.url for kind, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()


def reference(
    model_dir: Path, images: list[Image.Image], prompts: list[str]
) -> tuple[list[float], list[float]]:
    """(PickScore, cosine) of each pair from CLIPModel's own forward: `logits_per_image` is exp(logit_scale) times
    the cosines of its normalised `image_embeds` and `text_embeds`, so its diagonal is the per-pair PickScore."""
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    inputs = processor(
        text=prompts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
    )
    with torch.no_grad():
        out = clip(**inputs)
    cosine = (out.image_embeds * out.text_embeds).sum(-1)  # [B]: both are unit vectors
    return out.logits_per_image.diagonal().tolist(), cosine.tolist()


def post(url: str, images: list[str], prompts: list[str]) -> httpx.Response:
    return httpx.post(url + "/v1/score", json={"images": images, "prompts": prompts}, timeout=60)


@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_clipmodels_own_forward(urls: dict[str, str], tiny_models: Path, kind: str) -> None:
    r = post(urls[kind], [png_b64(im) for im in IMAGES], PROMPTS)
    assert r.status_code == 200, r.text
    body = r.json()
    pick, cosine = reference(tiny_models / kind, IMAGES, PROMPTS)
    assert body["cosine"] == pytest.approx(cosine, abs=1e-4)
    if kind == "pickscore":
        assert body["scores"] == pytest.approx(pick, abs=1e-4)
    else:  # CLIPScore = 2.5 * max(cos, 0): these random weights give both signs, so the clamp is exercised
        assert min(cosine) < 0 < max(cosine), f"the tiny CLIP changed: pick images with both signs {cosine}"
        assert body["scores"] == pytest.approx([2.5 * max(c, 0.0) for c in cosine], abs=1e-4)
    assert all(math.isfinite(s) for s in body["scores"])
    assert len({round(c, 6) for c in body["cosine"]}) == len(PROMPTS)


def test_the_two_kinds_differ_in_weights_and_clipscore_shares_the_aesthetic_clip(tiny_models: Path) -> None:
    files = {d: (tiny_models / d / "model.safetensors").read_bytes() for d in ("pickscore", "clipscore")}
    assert files["pickscore"] != files["clipscore"]
    assert files["clipscore"] == (tiny_models / "aesthetic" / "clip" / "model.safetensors").read_bytes()


def test_a_pair_scores_the_same_alone_and_in_a_padded_batch(urls: dict[str, str]) -> None:
    """Batching pads prompts to the longest and merges requests: neither may change a pair's score."""
    alone = post(urls["pickscore"], [png_b64(IMAGES[0])], [PROMPTS[0]]).json()["scores"][0]
    batched = post(urls["pickscore"], [png_b64(im) for im in IMAGES[:5]], PROMPTS[:5]).json()["scores"]
    assert batched[0] == pytest.approx(alone, abs=1e-5)
    assert batched[2] != pytest.approx(batched[0], abs=1e-3)  # the same prompt with another image


@pytest.mark.parametrize("kind", KINDS)
def test_mismatched_counts_are_a_422_naming_the_prompts(urls: dict[str, str], kind: str) -> None:
    r = post(urls[kind], [png_b64(IMAGES[0]), png_b64(IMAGES[1])], ["a cat"])
    assert r.status_code == 422
    assert "prompts" in r.json()["detail"] and "1 prompts for 2 images" in r.json()["detail"]


def test_bad_input_is_refused_naming_the_image_and_the_server_keeps_serving(urls: dict[str, str]) -> None:
    url = urls["clipscore"]
    r = post(url, [png_b64(IMAGES[0]), "@@not base64@@"], ["a", "b"])
    assert r.status_code in (400, 422), r.text  # 422 where the schema's base64 pattern refuses it first
    assert re.search(r"images(\.|\[)1", r.json()["detail"]), r.json()
    not_an_image = base64.b64encode(b"plain text, not a picture").decode()
    r = post(url, [not_an_image], ["a"])
    assert r.status_code == 400 and "images[0]" in r.json()["detail"]
    assert post(url, [png_b64(IMAGES[0])] * 9, ["a"] * 9).status_code == 413
    assert post(url, [png_b64(IMAGES[0])], [7]).status_code == 422  # strict: a number is not a prompt
    assert post(url, [png_b64(IMAGES[0])], ["a"]).status_code == 200


def test_the_registry_rewards_score_through_the_http_client(urls: dict[str, str], tiny_models: Path) -> None:
    """REWARDS["pickscore"] and ["clipscore"] send JPEGs (quality 95) with their prompts; the client splits 6 pairs
    into requests of 4 and 2 and puts the replies back in order."""

    async def score(name: str) -> tuple[list[float], dict]:
        async with RewardClient({k: [u] for k, u in urls.items()}, max_batch=4) as client:
            return await client.score(name, IMAGES, PROMPTS, [{}] * len(PROMPTS))

    # what the server decodes: the JPEG the reward sends
    sent = [
        Image.open(io.BytesIO(base64.b64decode(encode_image(im, fmt="JPEG")))).convert("RGB") for im in IMAGES
    ]
    assert REWARDS["pickscore"].servers == ("pickscore",) and REWARDS["pickscore"].local is None
    scores, info = asyncio.run(score("pickscore"))
    pick, cosine = reference(tiny_models / "pickscore", sent, PROMPTS)
    assert scores == pytest.approx(pick, abs=1e-4)
    assert info["pickscore"] == scores and info["pickscore_cosine"] == pytest.approx(cosine, abs=1e-4)
    scores, info = asyncio.run(score("clipscore"))
    _, cosine = reference(tiny_models / "clipscore", sent, PROMPTS)
    assert scores == pytest.approx([2.5 * max(c, 0.0) for c in cosine], abs=1e-4)
    assert info["clipscore_cosine"] == pytest.approx(cosine, abs=1e-4)


def test_the_real_model_ids_are_the_defaults() -> None:
    assert PickScoreSettings().model == PICKSCORE_MODEL == "yuvalkirstain/PickScore_v1"
    assert (
        PickScoreSettings().processor_path() == PICKSCORE_PROCESSOR == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    )
    assert PickScoreSettings(model="/m").processor_path() == "/m"  # a directory brings its own processor
    assert PickScoreSettings(model="/m", processor="/p").processor_path() == "/p"
    assert ClipScoreSettings().model == CLIPSCORE_MODEL == "openai/clip-vit-large-patch14"
    assert ClipScoreSettings().processor_path() == CLIPSCORE_MODEL


def test_the_rewards_are_config_names_terms_and_watch_rewards() -> None:
    """`reward.name` over http with a spawned server, a term next to a local reward, and watched rewards."""
    cfg = TrainConfig.model_validate(
        {"reward": {"name": "pickscore", "mode": "http", "servers": {"pickscore": {"spawn": True}}}}
    )
    assert cfg.reward.name == "pickscore" and "pickscore" in cfg.reward.servers
    terms = [{"name": "jpeg_compressibility"}, {"name": "pickscore", "weight": 0.5, "mode": "http"}]
    cfg = TrainConfig.model_validate({"reward": {"terms": terms, "servers": {"pickscore": {"spawn": True}}}})
    assert [cfg.reward.term_mode(t) for t in cfg.reward.resolved_terms] == ["local", "http"]
    with pytest.raises(ValueError, match="'pickscore' needs mode http"):  # a term runs where its mode says
        TrainConfig.model_validate({"reward": {"terms": [{"name": "pickscore"}]}})
    cfg = TrainConfig.model_validate(
        {"reward": {"servers": {"clipscore": {"urls": ["http://127.0.0.1:1"]}}},
         "evaluation": {"watch_rewards": ["clipscore", "pickscore"]}}
    )  # fmt: skip
    assert cfg.evaluation.watch_rewards == ["clipscore", "pickscore"]
    with pytest.raises(ValueError, match="reward.servers.clipscore"):
        TrainConfig.model_validate({"reward": {"name": "clipscore", "mode": "http"}})
    with pytest.raises(ValueError, match="reward.servers.pickscore"):
        TrainConfig.model_validate({"reward": {"terms": terms}})
