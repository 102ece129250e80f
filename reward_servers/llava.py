"""LLaVA server: `POST /v1/answer` -> greedy answers to questions about images.

`questions[i]` is a list of questions about `images[i]`; every (image, question) pair is one item of the shared
batcher, so pairs from many requests are answered in one `generate` call. Loads with transformers'
`LlavaForConditionalGeneration` + `AutoProcessor` (never `trust_remote_code`): the paper's
`llava-hf/llava-1.5-13b-hf` by default, or the tiny random model that `ddpo tiny-models` writes to `OUT/llava`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, HTTPException
from PIL import Image
from pydantic import Field

from reward_servers import kit
from services.reward_api import SERVER_APIS, AnswerRequest, AnswerResponse

API = SERVER_APIS["llava"]  # the endpoint and bodies of the HTTP contract

logger = logging.getLogger(__name__)

# The LLaVA-1.5 conversation format, for processors that ship without a chat template.
FALLBACK_PROMPT = "USER: <image>\n{question} ASSISTANT:"


class LlavaSettings(kit.ModelSettings):
    """LLaVA server settings."""

    model: str = Field("llava-hf/llava-1.5-13b-hf", description="hub id or directory of a LLaVA model")
    max_batch_size: int = Field(16, ge=1, description="most (image, question) pairs in one generate call")
    max_new_tokens: int = Field(
        256, ge=1, description="largest max_new_tokens a request may ask for; more -> 422"
    )
    max_questions: int = Field(16, ge=1, description="most questions about one image; more -> 413")
    max_question_tokens: int = Field(
        256, ge=1, description="longest question in tokens (the prompt must fit the context); longer -> 422"
    )


@dataclass(frozen=True)
class Question:
    """One batch item: an image, a question about it and the answer's token budget."""

    image: Image.Image
    text: str
    max_new_tokens: int


class LlavaAnswerer:
    """(image, question) pairs -> answers, by greedy decoding over the whole batch at once."""

    def __init__(self, model: Any, processor: Any, device: str, dtype: torch.dtype) -> None:
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # batched generation continues right after each prompt
        self.image_token: str = getattr(processor, "image_token", "<image>")
        self.device = device
        self.dtype = dtype

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return FALLBACK_PROMPT.format(question=question)

    @torch.inference_mode()
    def __call__(self, items: list[Question]) -> list[str]:
        images = [kit.center_crop_to_aspect(q.image) for q in items]
        prompts = [self.prompt(q.text) for q in items]
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)  # [B, 3, H, W]
        prompt_len = inputs["input_ids"].shape[1]
        # Greedy continuations do not depend on how far decoding goes, so the batch decodes to its largest budget
        # and each answer is cut to its own.
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(q.max_new_tokens for q in items),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )  # [B, prompt_len + new]
        new_tokens = output[:, prompt_len:]  # [B, new]
        return [
            self.processor.decode(row[: q.max_new_tokens], skip_special_tokens=True).strip()
            for row, q in zip(new_tokens, items, strict=True)
        ]


def load_answerer(settings: LlavaSettings) -> LlavaAnswerer:
    """LlavaForConditionalGeneration + AutoProcessor from a hub id or directory (no remote code)."""
    # lazily: `ddpo serve` imports every server module, and only the served model needs transformers
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = settings.torch_dtype()
    model = LlavaForConditionalGeneration.from_pretrained(settings.model, dtype=dtype).to(settings.device)
    processor = AutoProcessor.from_pretrained(settings.model)
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    logger.info("llava: %s, %s on %s", settings.model, dtype, settings.device)
    return LlavaAnswerer(model, processor, settings.device, dtype)


def create_app(settings: LlavaSettings) -> FastAPI:
    """The llava server's app: POST /v1/answer plus the kit's endpoints."""
    router = APIRouter(tags=["llava"])

    def check_question(answerer: LlavaAnswerer, question: str, where: str) -> None:
        """422 for text that would break the prompt: the image placeholder, or more tokens than allowed."""
        if answerer.image_token in question:
            raise HTTPException(422, f"{where} must not contain {answerer.image_token!r}")
        if answerer.count_tokens(question) > settings.max_question_tokens:
            raise HTTPException(422, f"{where} is over the limit of {settings.max_question_tokens} tokens")

    @router.post(API.path, response_model=API.response, responses=kit.V1_ERRORS)
    async def answer(body: AnswerRequest, inference: kit.InferenceDep) -> AnswerResponse:
        """Greedy answers, `answers[i][j]` for `questions[i][j]` about `images[i]`."""
        if body.max_new_tokens > settings.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens is over the limit of {settings.max_new_tokens}")
        inference.check_count(len(body.images))
        for i, questions in enumerate(body.questions):
            if len(questions) > settings.max_questions:
                raise HTTPException(
                    413,
                    f"questions[{i}]: {len(questions)} questions is over the limit of {settings.max_questions}",
                )
            for j, question in enumerate(questions):
                check_question(inference.model, question, f"questions[{i}][{j}]")
        images = await inference.decode_images(body.images)
        items = [
            Question(image, question, body.max_new_tokens)
            for image, questions in zip(images, body.questions, strict=True)
            for question in questions
        ]
        flat = iter(await inference.run(items))
        return AnswerResponse(answers=[[next(flat) for _ in questions] for questions in body.questions])

    return kit.create_app(
        settings,
        title="ddpo reward: llava",
        description=__doc__ or "",
        load_model=lambda: load_answerer(settings),
        router=router,
    )
