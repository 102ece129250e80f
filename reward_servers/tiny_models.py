"""Tiny random-weight reward models, so that the llava, aesthetic, pickscore and clipscore servers run offline and on a
CPU.

All are written with `save_pretrained` (safetensors) in the layouts the real models use, and the servers load them
with the same code that loads `llava-hf/llava-1.5-13b-hf`, `openai/clip-vit-large-patch14` and
`yuvalkirstain/PickScore_v1`:

    OUT/llava/       config.json, model.safetensors, generation_config.json, processor_config.json,
                     tokenizer.json, tokenizer_config.json, chat_template.jinja
    OUT/aesthetic/   clip/ (a tiny CLIP, as below)
                     mlp.safetensors (the LAION aesthetic MLP head, input size = the tiny CLIP's projection size)
    OUT/clipscore/   a tiny CLIP (CLIPModel: config.json, model.safetensors; CLIPProcessor: processor_config.json,
                     tokenizer.json, tokenizer_config.json): the same weights as aesthetic/clip/, as the real
                     CLIPScore and aesthetic servers share openai/clip-vit-large-patch14
    OUT/pickscore/   a tiny CLIP of the same shape with other weights (PickScore is a fine-tuned CLIP)

The tokenizers are built here, so any text tokenizes without a download: LLaVA's is byte-level (256 byte symbols, no
merges), CLIP's character-level. Weights are random but seeded: the same files every time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from reward_servers.aesthetic import CLIP_SUBDIR, MLP_FILE, AestheticMLP

logger = logging.getLogger(__name__)

SEED = 0
IMAGE_SIZE = 32  # tiny CLIP input side (the real models use 224 / 336)
PATCH_SIZE = 8  # -> (32 / 8)^2 = 16 image tokens per image in the tiny LLaVA
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
# The LLaVA-1.5 conversation format ("USER: <image>\n{question} ASSISTANT:"), as a chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tiny_clip_vision_kwargs() -> dict[str, int]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }


def _clip_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token, specials first."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def write_tiny_llava(out_dir: str | Path) -> Path:
    """A ~60k-parameter LlavaForConditionalGeneration (CLIP vision tower + Llama) and its LlavaProcessor."""
    out = Path(out_dir)
    tokenizer = build_byte_tokenizer()
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",  # drop CLS, like llava-1.5
        num_additional_image_tokens=1,  # the CLS position
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_tiny_clip_vision_kwargs()),
        text_config=text_config,
        image_token_index=IMAGE_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("wrote tiny llava to %s", out)
    return out


def build_clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer: printable ASCII, each with an end-of-word variant, no merges. As in
    CLIP, <|endoftext|> ends every text and pads; the text model pools at its first occurrence."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_clip(seed: int = SEED) -> tuple[CLIPModel, CLIPProcessor]:
    """A ~100k-parameter CLIPModel (text + vision towers, projection 16) and its processor."""
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_tiny_clip_vision_kwargs(),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    return clip, CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer)


def write_tiny_clip(out_dir: str | Path, seed: int = SEED) -> Path:
    """`build_tiny_clip(seed)` saved to out_dir: what CLIPModel / AutoTokenizer / AutoImageProcessor load."""
    out = Path(out_dir)
    clip, processor = build_tiny_clip(seed)
    clip.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_aesthetic(out_dir: str | Path) -> Path:
    """A tiny CLIP in `clip/` and an aesthetic MLP head in `mlp.safetensors`."""
    out = Path(out_dir)
    clip, processor = build_tiny_clip()
    clip.save_pretrained(out / CLIP_SUBDIR)
    processor.save_pretrained(out / CLIP_SUBDIR)
    mlp = AestheticMLP(
        input_dim=clip.config.projection_dim
    )  # seeded too: drawn right after the CLIP's weights
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(out / MLP_FILE))
    logger.info("wrote tiny aesthetic predictor to %s", out)
    return out


def write_tiny_similarity_models(out_dir: str | Path) -> Path:
    """OUT/clipscore (the aesthetic server's tiny CLIP) and OUT/pickscore (another seed)."""
    out = Path(out_dir)
    write_tiny_clip(out / "clipscore", seed=SEED)
    write_tiny_clip(out / "pickscore", seed=SEED + 1)
    logger.info("wrote tiny clipscore and pickscore CLIPs to %s", out)
    return out


def write_tiny_reward_models(out_dir: str | Path) -> Path:
    """OUT/llava, OUT/aesthetic, OUT/clipscore and OUT/pickscore (what `ddpo tiny-models` adds next to OUT/sd)."""
    out = Path(out_dir)
    write_tiny_llava(out / "llava")
    write_tiny_aesthetic(out / "aesthetic")
    write_tiny_similarity_models(out)
    return out
