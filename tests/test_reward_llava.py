"""The llava reward server on loopback (a thread of the test process: reward_server_utils.ServerThread) with the tiny
random LLaVA that `write_tiny_llava` writes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from reward_server_utils import ServerThread, noise_image, png_b64, start_servers

MAX_ITEMS = 4
MAX_QUESTIONS = 3
MAX_NEW_TOKENS = 64  # the request default: bodies without max_new_tokens are valid
IMAGES = [png_b64(noise_image(i, (40 + 8 * i, 32))) for i in range(3)]


@pytest.fixture(scope="module")
def url(tiny_models: Path) -> Iterator[str]:
    model_dir = tiny_models / "llava"  # the session's tiny LLaVA (conftest.py)
    server = ServerThread(
        "llava",
        *("--model", str(model_dir), "--max-items", str(MAX_ITEMS), "--max-questions", str(MAX_QUESTIONS)),
        *("--max-new-tokens", str(MAX_NEW_TOKENS), "--max-question-tokens", "64"),
        *("--max-batch-size", "8", "--max-wait-ms", "20"),
    )
    try:
        start_servers(server)
        yield server.url
    finally:
        server.stop()


def answer(url: str, images: list, questions: list, max_new_tokens: int = 8) -> httpx.Response:
    body = {"images": images, "questions": questions, "max_new_tokens": max_new_tokens}
    return httpx.post(url + "/v1/answer", json=body, timeout=60)


def test_one_answer_per_question(url: str) -> None:
    questions = [["What is in this image?", "What color is it?", "Is it day?"], ["Describe it."], []]
    r = answer(url, IMAGES, questions)
    assert r.status_code == 200, r.text
    answers = r.json()["answers"]
    assert [len(a) for a in answers] == [3, 1, 0]
    assert all(isinstance(a, str) for per_image in answers for a in per_image)


def test_greedy_answers_are_deterministic_and_independent_of_batch_mates(url: str) -> None:
    alone = answer(url, IMAGES[:1], [["What is in this image?"]]).json()["answers"][0][0]
    again = answer(url, IMAGES[:1], [["What is in this image?"]]).json()["answers"][0][0]
    assert alone == again

    async def concurrently() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            bodies = [
                {"images": IMAGES[:1], "questions": [["What is in this image?"]], "max_new_tokens": 8},
                {
                    "images": IMAGES[1:3],
                    "questions": [["A much longer question?"], ["Hm?"]],
                    "max_new_tokens": 5,
                },
            ]
            return await asyncio.gather(*(client.post("/v1/answer", json=b) for b in bodies))

    first, second = asyncio.run(concurrently())
    assert first.json()["answers"] == [[alone]]
    assert [len(a) for a in second.json()["answers"]] == [1, 1]


def test_answers_respect_max_new_tokens(url: str) -> None:
    short = answer(url, IMAGES[:1], [["What is in this image?"]], max_new_tokens=2).json()["answers"][0][0]
    longer = answer(url, IMAGES[:1], [["What is in this image?"]], max_new_tokens=10).json()["answers"][0][0]
    # The tiny tokenizer is byte-level: n tokens decode to at most n characters.
    assert len(short) <= 2 and len(longer) <= 10


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"images": IMAGES[:2], "questions": [["q"]]}, 422, "one list per image"),
        ({"images": IMAGES[:1], "questions": ["not a list"]}, 422, "questions.0"),
        ({"images": IMAGES[:1], "questions": [["q"]], "max_new_tokens": "8"}, 422, "max_new_tokens"),
        ({"images": IMAGES[:1], "questions": [["q"]], "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"images": IMAGES[:1], "questions": [["q"]], "max_new_tokens": MAX_NEW_TOKENS + 1}, 422, "limit"),
        ({"images": IMAGES[:1], "questions": [["what is <image>?"]]}, 422, "<image>"),
        (
            {"images": IMAGES[:1], "questions": [["q", "why " * 20]]},
            422,
            "questions[0][1] is over the limit of 64",
        ),
        ({"images": IMAGES[:1], "questions": [["q"] * (MAX_QUESTIONS + 1)]}, 413, "questions[0]"),
        ({"images": IMAGES[:1] * (MAX_ITEMS + 1), "questions": [["q"]] * (MAX_ITEMS + 1)}, 413, "images"),
        ({"images": [IMAGES[0], "@@"], "questions": [["q"], ["q"]]}, 400, "images[1]"),
    ],
)
def test_bad_input_is_refused_and_the_server_keeps_serving(
    url: str, body: dict, status: int, words: str
) -> None:
    r = httpx.post(url + "/v1/answer", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert answer(url, IMAGES[:1], [["q"]]).status_code == 200
