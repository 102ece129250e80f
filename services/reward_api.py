"""The reward HTTP API, written once: the request and response bodies (pydantic) and, per reward-server kind, its
endpoint. The servers (`reward_servers/`) declare their routes with these models and the client
(`services.reward_client`) builds its requests and checks the replies with the same models.

Images are base64 strings of PNG, JPEG or WebP bytes; a `data:image/...;base64,` prefix is accepted. The models are
strict: a number where a string belongs (or the reverse) is a 422, never a silent conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TEXT_CHARS = 4096

# A wire image: standard base64 (RFC 4648: padded, no line breaks), optionally behind a data URL prefix. The pattern
# is the whole rule: the servers decode exactly the strings it matches (reward_servers/kit/images.py), so a request
# that is valid by the schema is decodable, and anything else is a 400 naming the image.
DATA_URL_PREFIX_PATTERN = r"data:image/[A-Za-z0-9.+-]+;base64,"
BASE64_PATTERN = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
BASE64_IMAGE_PATTERN = f"^(?:{DATA_URL_PREFIX_PATTERN})?{BASE64_PATTERN}$"
# A 1x1 red PNG: the example /docs shows and schemathesis sends first, so that fuzzing also sees the 200 answers.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)

Base64Image = Annotated[
    str,
    Field(
        description="base64 PNG/JPEG/WebP bytes, optionally with a data:image/...;base64, prefix",
        json_schema_extra={"contentEncoding": "base64", "pattern": BASE64_IMAGE_PATTERN},
        examples=[EXAMPLE_PNG_BASE64],
    ),
]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class ImagesRequest(_Strict):
    """Images to score (jpeg and aesthetic servers)."""

    images: list[Base64Image]


class ScoreResponse(_Strict):
    """One score per image, in request order."""

    scores: list[float]


class JpegScoreResponse(ScoreResponse):
    """`scores` = -jpeg_kb (compressibility); `jpeg_kb` = kB (bytes / 1000) of the RGB image as JPEG quality 95."""

    jpeg_kb: list[float]


class ImagesPromptsRequest(_Strict):
    """Images with the prompt each was generated for (pickscore and clipscore servers): `prompts[i]` goes with
    `images[i]`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"images": [EXAMPLE_PNG_BASE64], "prompts": ["a red square"]}]}
    )

    images: list[Base64Image]
    prompts: list[Text]

    @model_validator(mode="after")
    def _one_prompt_per_image(self) -> ImagesPromptsRequest:
        if len(self.prompts) != len(self.images):
            raise ValueError(
                f"prompts must hold one prompt per image: got {len(self.prompts)} prompts for {len(self.images)} images"
            )
        return self


class SimilarityScoreResponse(ScoreResponse):
    """`cosine` = cosine similarity of the CLIP embeddings of `images[i]` and `prompts[i]`; `scores` = the server's
    score of that pair computed from it (pickscore: logit_scale.exp() * cosine; clipscore: 2.5 * max(cosine, 0))."""

    cosine: list[float]


class AnswerRequest(_Strict):
    """Questions about images (llava server): `questions[i]` is the list of questions about `images[i]`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "images": [EXAMPLE_PNG_BASE64],
                    "questions": [["What is in the image?"]],
                    "max_new_tokens": 8,
                }
            ]
        }
    )

    images: list[Base64Image]
    questions: list[list[Text]]
    max_new_tokens: int = Field(64, ge=1, description="most tokens generated per answer (greedy decoding)")

    @model_validator(mode="after")
    def _one_question_list_per_image(self) -> AnswerRequest:
        if len(self.questions) != len(self.images):
            raise ValueError(
                f"questions must hold one list per image: got {len(self.questions)} lists for {len(self.images)} images"
            )
        return self


class AnswerResponse(_Strict):
    """`answers[i][j]` answers `questions[i][j]`."""

    answers: list[list[str]]


class TextPairsRequest(_Strict):
    """Candidate/reference pairs (bertscore server): `candidates[i]` is compared with `references[i]`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"candidates": ["a red square"], "references": ["a red image"]}]}
    )

    candidates: list[Text]
    references: list[Text]

    @model_validator(mode="after")
    def _same_length(self) -> TextPairsRequest:
        if len(self.candidates) != len(self.references):
            raise ValueError(
                f"candidates and references must have the same length: got {len(self.candidates)} and "
                f"{len(self.references)}"
            )
        return self


class BertScoreResponse(_Strict):
    """BERTScore of each pair: precision, recall and F1, in request order."""

    precision: list[float]
    recall: list[float]
    f1: list[float]


@dataclass(frozen=True)
class ServerApi:
    """One reward-server kind's endpoint: POST `path` with a `request` body, answered with a `response` body. Every
    list field of a request holds one item per input (images, or text pairs), and every list field of the response
    one result per input, in order; a client may split a request into several along those lists."""

    path: str
    request: type[BaseModel]
    response: type[BaseModel]


SERVER_APIS: dict[str, ServerApi] = {
    "jpeg": ServerApi("/v1/score", ImagesRequest, JpegScoreResponse),
    "aesthetic": ServerApi("/v1/score", ImagesRequest, ScoreResponse),
    "llava": ServerApi("/v1/answer", AnswerRequest, AnswerResponse),
    "bertscore": ServerApi("/v1/score", TextPairsRequest, BertScoreResponse),
    "pickscore": ServerApi("/v1/score", ImagesPromptsRequest, SimilarityScoreResponse),
    "clipscore": ServerApi("/v1/score", ImagesPromptsRequest, SimilarityScoreResponse),
}
