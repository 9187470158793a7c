"""The config and processor of each tiny image-text-to-text family (``tiny_vlm.py`` builds the model from them).

Each ``Family`` holds the special tokens its processor needs (named ones become tokenizer attributes such as
``tokenizer.image_token``), the placeholder string the chat template writes for an ``{"type": "image"}`` part, the
default image side, and ``make(tok, side, text, vision) -> (config, processor)``: ``text`` and ``vision`` are the
tiny sub-config keyword arguments (defaults merged with the caller's overrides). Every width is a multiple of 32
(bitsandbytes' CPU kernels), and the image side sets the number of image tokens (a few by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
IDEFICS_GRID = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]  # image splitting's tile tags


@dataclass(frozen=True)
class Family:
    """What one family needs: tokens, the chat template's image placeholder, the default image side, a maker."""

    make: Callable[..., tuple[Any, Any]]
    placeholder: str
    side: int
    named: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    needs_torchvision: bool = False


def _ids(tok) -> dict[str, Any]:
    """The text config's special ids and vocabulary size (taken after the processor added its tokens)."""
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


def _tv(name: str):
    """An image processor class of ``transformers``: the torchvision one when torchvision imports, else the PIL one
    (as ``AutoImageProcessor`` picks on loading)."""
    import transformers
    from transformers.utils import is_torchvision_available

    return getattr(transformers, name if is_torchvision_available() else f"{name}Pil")


def _clip_vision(side: int, patch: int, vision: dict) -> dict:
    return dict(model_type="clip_vision_model", image_size=side, patch_size=patch, projection_dim=32, **vision)


def _siglip_vision(side: int, patch: int, vision: dict) -> dict:
    return dict(model_type="siglip_vision_model", image_size=side, patch_size=patch, **vision)


def _square(side: int) -> dict:
    return {"height": side, "width": side}


# ---- LLaVA, LLaVA-NeXT, LLaVA-OneVision: CLIP / SigLIP patches, one token per patch --------------------------------

def _llava(tok, side, text, vision):
    from transformers import LlavaConfig, LlavaProcessor

    ip = _tv("CLIPImageProcessor")(size={"shortest_edge": side}, crop_size=_square(side))
    proc = LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(vision_config=_clip_vision(side, 8, vision),
                      text_config=dict(model_type="llama", **text, **_ids(tok)),
                      image_token_index=tok.image_token_id, image_seq_length=(side // 8) ** 2,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    return cfg, proc


def _llava_next(tok, side, text, vision):
    from transformers import LlavaNextConfig, LlavaNextProcessor

    grid = [[side, side]]
    ip = _tv("LlavaNextImageProcessor")(size={"shortest_edge": side}, crop_size=_square(side),
                                        image_grid_pinpoints=grid)
    proc = LlavaNextProcessor(ip, tok, patch_size=16, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    cfg = LlavaNextConfig(vision_config=_clip_vision(side, 16, vision),
                          text_config=dict(model_type="llama", **text, **_ids(tok)),
                          image_token_index=tok.image_token_id, image_grid_pinpoints=grid,
                          vision_feature_layer=-1, vision_feature_select_strategy="default")
    return cfg, proc


def _llava_onevision(tok, side, text, vision):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    grid = [[side, side]]
    ip = _tv("LlavaOnevisionImageProcessor")(size=_square(side), image_grid_pinpoints=grid)
    vp = LlavaOnevisionVideoProcessor(size=_square(side))
    proc = LlavaOnevisionProcessor(ip, tok, vp, num_image_tokens=(side // 16) ** 2,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    cfg = LlavaOnevisionConfig(vision_config=_siglip_vision(side, 16, vision),
                               text_config=dict(model_type="qwen2", **text, **_ids(tok)),
                               image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                               image_grid_pinpoints=grid, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return cfg, proc


# ---- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: patches merged 2 x 2, M-RoPE -------------------------------------------------

def _qwen_processor(tok, side, patch, processor_cls, video_cls):
    size = {"shortest_edge": side * side, "longest_edge": side * side}  # any image -> about side x side
    ip = _tv("Qwen2VLImageProcessor")(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    vp = video_cls(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    return processor_cls(ip, tok, vp)


def _qwen_ids(tok) -> dict[str, Any]:
    return dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)


def _qwen_vision(vision: dict, text: dict, patch: int) -> dict:
    """Qwen2.5-VL / Qwen3-VL vision config keywords (Qwen2-VL names its width ``embed_dim``)."""
    return dict(depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                out_hidden_size=text["hidden_size"], patch_size=patch, spatial_merge_size=2)


def _mrope(text: dict) -> dict:
    """M-RoPE over the head's rotary half: sections (temporal, height, width) that sum to head_dim / 2."""
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    return {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}


def _qwen2_vl(tok, side, text, vision):
    from transformers import Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor

    proc = _qwen_processor(tok, side, 8, Qwen2VLProcessor, Qwen2VLVideoProcessor)
    v = dict(depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
             embed_dim=vision["hidden_size"], mlp_ratio=2, hidden_size=text["hidden_size"], patch_size=8, spatial_merge_size=2)
    cfg = Qwen2VLConfig(vision_config=v, text_config=dict(**text, **_ids(tok), rope_parameters=_mrope(text)),
                        **_qwen_ids(tok))
    return cfg, proc


def _qwen2_5_vl(tok, side, text, vision):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    proc = _qwen_processor(tok, side, 8, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor)
    v = dict(_qwen_vision(vision, text, 8), window_size=32, fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(vision_config=v, text_config=dict(**text, **_ids(tok), rope_parameters=_mrope(text)),
                           **_qwen_ids(tok))
    return cfg, proc


def _qwen3_vl(tok, side, text, vision):
    from transformers import Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    proc = _qwen_processor(tok, side, 16, Qwen3VLProcessor, Qwen3VLVideoProcessor)
    v = dict(_qwen_vision(vision, text, 16), num_position_embeddings=16, deepstack_visual_indexes=[0])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {**_mrope(text), "mrope_interleaved": True}
    t = dict(text, head_dim=head_dim, rope_parameters=rope, **_ids(tok))
    t.pop("bos_token_id"), t.pop("eos_token_id")
    cfg = Qwen3VLConfig(vision_config=v, text_config=t, image_token_id=tok.image_token_id,
                        video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                        vision_end_token_id=tok.vision_end_token_id)
    return cfg, proc


# ---- Idefics3 / SmolVLM: pixel shuffle (4 patches -> 1 token), no image splitting by default -----------------------

def _idefics3(tok, side, text, vision, smol: bool = False):
    from transformers import (
        Idefics3Config,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    seq = (side // 8) ** 2 // 4
    kw = dict(do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side})
    v = dict(image_size=side, patch_size=8, **vision)
    t = dict(model_type="llama", **text, **_ids(tok))
    if smol:
        vp = SmolVLMVideoProcessor(size={"longest_edge": side}, max_image_size={"longest_edge": side})
        smol_proc = SmolVLMProcessor(_tv("SmolVLMImageProcessor")(**kw), tok, vp, image_seq_len=seq)
        smol_cfg = SmolVLMConfig(vision_config=v, text_config=t, image_token_id=tok.image_token_id, scale_factor=2)
        return smol_cfg, smol_proc
    proc = Idefics3Processor(_tv("Idefics3ImageProcessor")(**kw), tok, image_seq_len=seq)
    return Idefics3Config(vision_config=v, text_config=t, image_token_id=tok.image_token_id, scale_factor=2), proc


def _smolvlm(tok, side, text, vision):
    return _idefics3(tok, side, text, vision, smol=True)


# ---- Gemma 3, PaliGemma: SigLIP ------------------------------------------------------------------------------------

def _gemma_text(text: dict, tok) -> dict:
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return dict(text, head_dim=head_dim, **_ids(tok))


def _gemma3(tok, side, text, vision):
    from transformers import Gemma3Config, Gemma3Processor

    tokens = (side // 16) ** 2  # 8-pixel patches pooled 2 x 2
    proc = Gemma3Processor(_tv("Gemma3ImageProcessor")(size=_square(side)), tok, image_seq_length=tokens)
    t = dict(_gemma_text(text, tok), query_pre_attn_scalar=text["hidden_size"] // text["num_attention_heads"],
             sliding_window=512)
    cfg = Gemma3Config(vision_config=_siglip_vision(side, 8, vision), text_config=t, mm_tokens_per_image=tokens,
                       boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                       image_token_index=tok.image_token_id)
    return cfg, proc


def _paligemma(tok, side, text, vision):
    from transformers import PaliGemmaConfig, PaliGemmaProcessor

    ip = _tv("SiglipImageProcessor")(size=_square(side))
    ip.image_seq_length = (side // 8) ** 2
    proc = PaliGemmaProcessor(ip, tok)  # adds its 1,152 location/segmentation tokens to the tokenizer
    cfg = PaliGemmaConfig(vision_config=dict(_siglip_vision(side, 8, vision), projection_dim=text["hidden_size"]),
                          text_config=dict(model_type="gemma", **_gemma_text(text, tok)),
                          image_token_index=tok.image_token_id, projection_dim=text["hidden_size"],
                          hidden_size=text["hidden_size"], vocab_size=len(tok))
    return cfg, proc


# ---- Mistral 3 (Pixtral), Aya Vision, InternVL ---------------------------------------------------------------------

def _mistral3(tok, side, text, vision):
    from transformers import Mistral3Config, PixtralProcessor

    ip = _tv("PixtralImageProcessor")(size={"longest_edge": side}, patch_size=8)
    proc = PixtralProcessor(ip, tok, patch_size=8, spatial_merge_size=2)
    v = dict(model_type="pixtral", image_size=side, patch_size=8, head_dim=vision["hidden_size"] //
             vision["num_attention_heads"], **vision)
    cfg = Mistral3Config(vision_config=v, text_config=dict(model_type="mistral", **text, **_ids(tok)),
                         image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return cfg, proc


def _aya_vision(tok, side, text, vision):
    from transformers import AyaVisionConfig, AyaVisionProcessor

    ip = _tv("GotOcr2ImageProcessor")(size=_square(side), crop_to_patches=False, max_patches=1)
    proc = AyaVisionProcessor(ip, tok, patch_size=8, img_size=side, downsample_factor=2)
    cfg = AyaVisionConfig(vision_config=_siglip_vision(side, 8, vision),
                          text_config=dict(model_type="cohere2", **text, **_ids(tok)), downsample_factor=2,
                          image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"))
    return cfg, proc


def _internvl(tok, side, text, vision):
    from transformers import InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    ip = _tv("GotOcr2ImageProcessor")(size=_square(side), crop_to_patches=False, max_patches=1)
    proc = InternVLProcessor(ip, tok, InternVLVideoProcessor(size=_square(side)), image_seq_length=(side // 16) ** 2)
    v = dict(image_size=[side, side], patch_size=[8, 8], **vision)
    cfg = InternVLConfig(vision_config=v, text_config=dict(model_type="qwen2", **text, **_ids(tok)),
                         image_token_id=tok.context_image_token_id, image_seq_length=(side // 16) ** 2,
                         downsample_ratio=0.5)
    return cfg, proc


_QWEN = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
             vision_end_token="<|vision_end|>")
_IDEFICS = ("<fake_token_around_image>", "<end_of_utterance>", "<global-img>", *IDEFICS_GRID)

FAMILY_SPECS: dict[str, Family] = {
    "llava": Family(_llava, "<image>", 32, dict(image_token="<image>")),
    "llava_next": Family(_llava_next, "<image>", 32, dict(image_token="<image>")),
    "llava_onevision": Family(_llava_onevision, "<image>", 32, dict(image_token="<image>", video_token="<video>"),
                              needs_torchvision=True),
    "qwen2_vl": Family(_qwen2_vl, "<|vision_start|><|image_pad|><|vision_end|>", 48, _QWEN, needs_torchvision=True),
    "qwen2_5_vl": Family(_qwen2_5_vl, "<|vision_start|><|image_pad|><|vision_end|>", 48, _QWEN,
                         needs_torchvision=True),
    "qwen3_vl": Family(_qwen3_vl, "<|vision_start|><|image_pad|><|vision_end|>", 64, _QWEN, needs_torchvision=True),
    "idefics3": Family(_idefics3, "<image>", 32, dict(image_token="<image>"), _IDEFICS),
    "smolvlm": Family(_smolvlm, "<image>", 32, dict(image_token="<image>", video_token="<video>"), _IDEFICS,
                      needs_torchvision=True),
    "gemma3": Family(_gemma3, "<start_of_image>", 32,
                     dict(image_token="<image_soft_token>", boi_token="<start_of_image>",
                          eoi_token="<end_of_image>")),
    "mistral3": Family(_mistral3, "[IMG]", 32, {}, ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), needs_torchvision=True),
    "paligemma": Family(_paligemma, "<image>", 32, dict(image_token="<image>")),
    "aya_vision": Family(_aya_vision, "<image>", 32, dict(image_token="<image>"),
                         ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE",
                          "TILE_GLOBAL")),
    "internvl": Family(_internvl, "<IMG_CONTEXT>", 32,
                       dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                            video_token="<video>"), needs_torchvision=True),
}
