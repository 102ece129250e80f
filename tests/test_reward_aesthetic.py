"""The aesthetic reward server on loopback (a thread of the test process: reward_server_utils.ServerThread) with the
tiny CLIP + MLP that `write_tiny_aesthetic` writes, and the MLP loading rules (safetensors, or .pth read as tensors
only)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from reward_server_utils import ServerThread, noise_image, png_b64, start_servers

from reward_servers.aesthetic import AestheticMLP, AestheticSettings, load_mlp_state_dict, resolve_weights


@pytest.fixture(scope="module")
def tiny_dir(tiny_models: Path) -> Path:
    """The session's tiny CLIP + MLP (conftest.py: `write_tiny_aesthetic`, as `ddpo tiny-models` writes it)."""
    return tiny_models / "aesthetic"


@pytest.fixture(scope="module")
def url(tiny_dir: Path) -> Iterator[str]:
    server = ServerThread(
        "aesthetic",
        *("--model", str(tiny_dir), "--max-items", "8", "--max-wait-ms", "20"),
    )
    try:
        start_servers(server)
        yield server.url
    finally:
        server.stop()


def reference_scores(tiny_dir: Path, images: list) -> list[float]:
    """The predictor written out by hand from the files: CLIP image embedding, L2 norm, five linear layers."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(tiny_dir / "clip").eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_dir / "clip")(images=images, return_tensors="pt")
    w = load_file(tiny_dir / "mlp.safetensors")
    with torch.no_grad():
        embed = clip.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output  # [B, 16]
        h = embed / embed.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # Dropout layers (1, 3, 5) are identities at inference
            h = h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    return h.squeeze(1).tolist()


def test_one_finite_score_per_image_matching_a_reference_computation(url: str, tiny_dir: Path) -> None:
    images = [noise_image(i, (64 + 16 * i, 48)) for i in range(5)]
    r = httpx.post(url + "/v1/score", json={"images": [png_b64(im) for im in images]}, timeout=60)
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert len(scores) == 5 and all(math.isfinite(s) for s in scores)
    assert scores == pytest.approx(reference_scores(tiny_dir, images), abs=1e-5)
    assert len({round(s, 7) for s in scores}) == 5


def test_extreme_aspect_ratio_is_scored_without_blowing_up(url: str) -> None:
    thin = noise_image(9, (4000, 1))  # resizing the short side to 32 first would make it 128000 x 32
    r = httpx.post(url + "/v1/score", json={"images": [png_b64(thin)]}, timeout=60)
    assert r.status_code == 200 and math.isfinite(r.json()["scores"][0])


@pytest.mark.parametrize(
    ("body", "status"),
    [({"images": ["@@"]}, 400), ({"images": [png_b64(noise_image(0))] * 9}, 413), ({"images": [None]}, 422)],
)
def test_bad_input_is_refused_and_the_server_keeps_serving(url: str, body: dict, status: int) -> None:
    assert httpx.post(url + "/v1/score", json=body, timeout=30).status_code == status
    ok = httpx.post(url + "/v1/score", json={"images": [png_b64(noise_image(1))]}, timeout=30)
    assert ok.status_code == 200


def test_published_pth_weights_load_as_tensors_only(tmp_path: Path) -> None:
    mlp = AestheticMLP(input_dim=768)  # the published sac+logos+ava1-l14-linearMSE.pth has this shape
    torch.save(mlp.state_dict(), tmp_path / "head.pth")
    state = load_mlp_state_dict(tmp_path / "head.pth")
    assert set(state) == set(mlp.state_dict())
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("pickled code ran",))

    # A .pth that would run code if it were unpickled.
    torch.save({"layers.0.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_mlp_state_dict(tmp_path / "evil.pth")


def test_weights_resolve_from_a_bundle_dir_or_explicit_paths(tiny_dir: Path) -> None:
    assert resolve_weights(AestheticSettings(model=str(tiny_dir))) == (
        str(tiny_dir / "clip"),
        tiny_dir / "mlp.safetensors",
    )
    hub = AestheticSettings(model="openai/clip-vit-large-patch14", mlp="/w/sac+logos+ava1-l14-linearMSE.pth")
    assert resolve_weights(hub) == (
        "openai/clip-vit-large-patch14",
        Path("/w/sac+logos+ava1-l14-linearMSE.pth"),
    )
    with pytest.raises(ValueError, match="--mlp"):
        resolve_weights(AestheticSettings(model="openai/clip-vit-large-patch14"))
