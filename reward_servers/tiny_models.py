"""Tiny random-weight reward models, so that the llava and aesthetic servers run offline and on a CPU.

Both are written with `save_pretrained` (safetensors) in the layouts the real models use, and the servers load them
with the same code that loads `llava-hf/llava-1.5-13b-hf` and `openai/clip-vit-large-patch14`:

    OUT/llava/       config.json, model.safetensors, generation_config.json, processor_config.json,
                     tokenizer.json, tokenizer_config.json, chat_template.jinja
    OUT/aesthetic/   clip/ (CLIPModel: config.json, model.safetensors, preprocessor_config.json)
                     mlp.safetensors (the LAION aesthetic MLP head, input size = the tiny CLIP's projection size)

The tokenizer is byte-level (256 byte symbols, no merges) and built here, so any text tokenizes without a download.
Weights are random but seeded: the same files every time.
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


def write_tiny_aesthetic(out_dir: str | Path) -> Path:
    """A tiny CLIPModel with its image processor in `clip/` and an aesthetic MLP head in `mlp.safetensors`."""
    out = Path(out_dir)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 128,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config=_tiny_clip_vision_kwargs(),
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    clip = CLIPModel(config).eval()
    mlp = AestheticMLP(input_dim=config.projection_dim)
    clip.save_pretrained(out / CLIP_SUBDIR)
    _clip_image_processor().save_pretrained(out / CLIP_SUBDIR)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(out / MLP_FILE))
    logger.info("wrote tiny aesthetic predictor to %s", out)
    return out


def write_tiny_reward_models(out_dir: str | Path) -> Path:
    """OUT/llava and OUT/aesthetic (what `ddpo tiny-models` adds next to OUT/sd)."""
    out = Path(out_dir)
    write_tiny_llava(out / "llava")
    write_tiny_aesthetic(out / "aesthetic")
    return out
