"""Tiny random models of every supported VLM family, each with its real processor class, built in process.

Every family gets the same small text decoder geometry (64 wide, 4 layers, 4 heads of 16, 2 KV heads,
FFN 128, vocabulary 512) and a one- or two-layer vision tower on 32-px images, so that the exactness
suite (tests/core/test_family_exactness.py) and the per-family HTTP tests (tests/families/) run in
seconds. Image processors are always the PIL ("...ImageProcessorPil") classes: torchvision is never
installed here. Processors that also hold a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM,
InternVL, LLaVA-OneVision) get `NoVideoProcessor`, a torchvision-free stand-in that refuses videos
(`eas.model.processors`).

Prompt format: the same one-line chat template for every family ("<image placeholder>question: ...
answer:"), with the family's own image placeholder, so serving and evaluation build prompts alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, ProcessorMixin

from eas.model.processors import NoVideoProcessor
from eas.zoo.llava import default_corpus
from eas.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

VOCAB = 512
IMAGE = 32  # image side in pixels
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=512,
            pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE, patch_size=8)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=IMAGE, patch_size=8)


def chat_template(image: str) -> str:
    """The project's prompt format with `image` as the family's image placeholder."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
        "{% elif part['type'] == 'text' %}question: {{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}"
    )


def _tokenizer(extra: dict[str, str] | None = None):
    return train_tokenizer(default_corpus(), vocab_size=VOCAB, extra=extra)


def _ids(tok, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model = model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model


# --- one builder per family: (seed) -> (model, processor) ---------------------------------------------

def _llava(seed: int, text_type: str = "llama"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer()
    text = dict(model_type=text_type, **TEXT)
    if text_type == "gemma2":
        text.update(query_pre_attn_scalar=16, sliding_window=8, hidden_activation="gelu_pytorch_tanh")
    config = LlavaConfig(vision_config=dict(model_type="clip_vision_model", **CLIP), text_config=text,
                         image_token_id=tok.image_token_id, vision_feature_select_strategy="default",
                         vision_feature_layer=-1, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template("<image>"))
    return model, processor


def _llava_next(seed: int):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer()
    pinpoints = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]]
    config = LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", **CLIP),
                             text_config=dict(model_type="llama", **TEXT), image_token_index=tok.image_token_id,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE},
                                                 crop_size={"height": IMAGE, "width": IMAGE},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_template("<image>"))
    return model, processor


def _llava_onevision(seed: int):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = _tokenizer({"video_token": "<video>"})
    pinpoints = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE]]
    config = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **SIGLIP),
                                  text_config=dict(model_type="qwen2", **TEXT),
                                  image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_1",
                                  pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE, "width": IMAGE},
                                                      image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                        video_processor=NoVideoProcessor(), num_image_tokens=16,
                                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                                        chat_template=chat_template("<image>"))
    return model, processor


def _paligemma(seed: int):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = _tokenizer()
    config = PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", projection_dim=64, **SIGLIP),
                             text_config=dict(model_type="gemma", hidden_activation="gelu_pytorch_tanh", **TEXT),
                             image_token_index=tok.image_token_id, projection_dim=64, hidden_size=64,
                             vocab_size=VOCAB, pad_token_id=PAD_ID,
                             # untied: with tied, sqrt(d)-scaled embeddings a random tiny Gemma only repeats
                             # its last token ("\n", which decodes to an empty answer)
                             tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    image_processor.image_seq_length = (IMAGE // 8) ** 2
    # PaliGemma's processor writes the image tokens and <s> itself and ends the prompt with "\n": the
    # template carries the question only.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=chat_template(""))
    return model, processor


def _gemma3(seed: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                      "image_token": "<image_soft_token>"})
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = dict(TEXT, query_pre_attn_scalar=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    config = Gemma3Config(text_config=text, vision_config=dict(SIGLIP, model_type="siglip_vision_model"),
                          mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image,
                          pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=chat_template("<start_of_image>"))
    return model, processor


_QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
_QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_ids(tok) -> dict[str, int]:
    image, video, start, end = _ids(tok, *_QWEN_TOKENS.values())
    return dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


def _qwen_processor(cls, tok, patch: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                               min_pixels=IMAGE**2, max_pixels=IMAGE**2)
    return cls(image_processor=image_processor, tokenizer=tok, video_processor=NoVideoProcessor(),
               chat_template=chat_template(_QWEN_PLACEHOLDER))


def _qwen2_vl(seed: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = _tokenizer(_QWEN_TOKENS)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2,
                                                                patch_size=8, spatial_merge_size=2),
                           **_qwen_ids(tok))
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(Qwen2VLProcessor, tok, 8)


def _qwen2_5_vl(seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = _tokenizer(_QWEN_TOKENS)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  out_hidden_size=64, window_size=16, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(Qwen2_5_VLProcessor, tok, 8)


def _qwen3_vl(seed: int):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok = _tokenizer(_QWEN_TOKENS)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                       "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config), _qwen_processor(Qwen3VLProcessor, tok, 8)


def _glm4v(seed: int):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tokens = {"image_token": "<|image|>", "video_token": "<|video|>", "image_start_token": "<|begin_of_image|>",
              "image_end_token": "<|end_of_image|>", "video_start_token": "<|begin_of_video|>",
              "video_end_token": "<|end_of_video|>"}
    tok = _tokenizer(tokens)
    image, video, start, end, vstart, vend = _ids(tok, *tokens.values())
    # GLM rotates half of each head (partial_rotary_factor 0.5): 8 of 16 dims, mrope sections sum to 4.
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                       "partial_rotary_factor": 0.5})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  out_hidden_size=64, image_size=IMAGE)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                         image_start_token_id=start, image_end_token_id=end, video_start_token_id=vstart,
                         video_end_token_id=vend)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config)
    image_processor = Glm4vImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                             size={"shortest_edge": IMAGE**2, "longest_edge": IMAGE**2})
    processor = Glm4vProcessor(image_processor=image_processor, tokenizer=tok, video_processor=NoVideoProcessor(),
                               chat_template=chat_template("<|begin_of_image|><|image|><|end_of_image|>"))
    return model, processor


_IDEFICS_TOKENS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                   "end_of_utterance_token": "<end_of_utterance>"}


def _idefics3_like(seed: int, smol: bool):
    if smol:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMProcessor as Processor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as ImageProcessor,
        )
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3Processor as Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as ImageProcessor,
        )
    tok = _tokenizer(_IDEFICS_TOKENS | ({"video_token": "<video>"} if smol else {}))
    config = Config(text_config=dict(model_type="llama", **TEXT),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=IMAGE, patch_size=8),
                    scale_factor=2, image_token_id=tok.image_token_id, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = Model(config)
    # One 32-px image, no splitting: 16 patches, pixel-shuffled by 2 -> 4 image tokens.
    image_processor = ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE},
                                     max_image_size={"longest_edge": IMAGE})
    kwargs = {"video_processor": NoVideoProcessor()} if smol else {}
    processor = Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                          chat_template=chat_template("<image>"), **kwargs)
    return model, processor


def _idefics2(seed: int):
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tok = _tokenizer({"image_boundary_token": "<fake_token_around_image>",
                      "end_of_utterance_token": "<end_of_utterance>"})
    perceiver = dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=16, num_key_value_heads=1)
    config = Idefics2Config(text_config=dict(model_type="mistral", **TEXT), perceiver_config=perceiver,
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=IMAGE, patch_size=8),
                            image_token_id=tok.image_token_id, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    # One 32-px image, no splitting, resampled to 4 latents = 4 image tokens.
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=False,
                                                size={"shortest_edge": IMAGE, "longest_edge": IMAGE})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=chat_template("<image>"))
    return model, processor


def _internvl(seed: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = _tokenizer({"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                      "video_token": "<video>"})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[IMAGE, IMAGE], patch_size=[8, 8])
    config = InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **TEXT),
                            image_token_id=tok.context_image_token_id, image_seq_length=4, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, crop_to_patches=False)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=NoVideoProcessor(),
                                  image_seq_length=4, chat_template=chat_template("<IMG_CONTEXT>"))
    return model, processor


class PixtralInputs:
    """Mistral3's inputs without PixtralProcessor, which imports torchvision in transformers 5.23 (its module
    imports the torchvision image processor): the PIL image processor and the tokenizer, with the image
    token rows PixtralProcessor would write ([IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END])."""

    def __init__(self, image_processor, tokenizer, patch: int, merge: int) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.unit = patch * merge
        self.chat_template = chat_template("[IMG]")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **_: object) -> str:
        from jinja2 import Template

        return Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    def __call__(self, images, text, return_tensors: str = "pt", padding: bool = True, **_: object):
        from transformers import BatchFeature

        flat = [im for group in images for im in (group if isinstance(group, list) else [group])]
        vision = self.image_processor(images=flat, return_tensors="pt")
        expanded = []
        for prompt, (height, width) in zip(text, vision["image_sizes"].tolist(), strict=True):
            rows, cols = height // self.unit, width // self.unit
            image = "[IMG_BREAK]".join(["[IMG]" * cols] * rows) + "[IMG_END]"
            expanded.append(prompt.replace("[IMG]", image, 1))
        tokens = self.tokenizer(expanded, return_tensors="pt", padding=True)
        return BatchFeature({**tokens, "pixel_values": vision["pixel_values"], "image_sizes": vision["image_sizes"]})

    def batch_decode(self, ids, **kwargs: object) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def _mistral3(seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = _tokenizer({"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                  image_size=IMAGE, patch_size=8)
    config = Mistral3Config(vision_config=vision, text_config=dict(model_type="mistral", **TEXT),
                            image_token_index=tok.image_token_id, spatial_merge_size=2, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": IMAGE}, patch_size=8)
    return model, PixtralInputs(image_processor, tok, patch=8, merge=2)


@dataclass(frozen=True)
class Family:
    """A supported family: its name in the support table, decoder kind and tiny builder."""

    name: str
    decoder: str  # the text decoder class family, as in docs/eas-core.md's table
    form: str  # "pre-norm" or "sandwich"
    builder: Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]
    # Why the family cannot be served through its real processor class here (None: it can).
    not_servable: str | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llava", "Llama", "pre-norm", _llava),
    Family("llava-gemma2", "Gemma2", "sandwich", lambda seed: _llava(seed, "gemma2")),
    Family("llava-next", "Llama", "pre-norm", _llava_next),
    Family("llava-onevision", "Qwen2", "pre-norm", _llava_onevision),
    Family("paligemma", "Gemma", "pre-norm", _paligemma),
    Family("gemma3", "Gemma3", "sandwich", _gemma3),
    Family("qwen2-vl", "Qwen2-VL", "pre-norm", _qwen2_vl),
    Family("qwen2.5-vl", "Qwen2.5-VL", "pre-norm", _qwen2_5_vl),
    Family("qwen3-vl", "Qwen3-VL", "pre-norm", _qwen3_vl),
    Family("glm4v", "GLM-4 (fused gate_up)", "sandwich (GLM)", _glm4v),
    Family("idefics2", "Mistral", "pre-norm", _idefics2),
    Family("idefics3", "Llama", "pre-norm", lambda seed: _idefics3_like(seed, smol=False)),
    Family("smolvlm", "Llama", "pre-norm", lambda seed: _idefics3_like(seed, smol=True)),
    Family("internvl", "Qwen2", "pre-norm", _internvl),
    Family("mistral3", "Mistral", "pre-norm", _mistral3,
           not_servable="PixtralProcessor imports torchvision in transformers 5.23"),
)}


def build_family(name: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A randomly initialised tiny model of family `name` (bit-identical for a seed) and its processor."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    model, processor = FAMILIES[name].builder(seed)
    processor.tokenizer.padding_side = "left"
    model = _finish(model)
    # A random model may "generate" an image placeholder, which the next cache-free step would read as an
    # image without features: only EOS among the special tokens may be generated.
    specials = set(processor.tokenizer.all_special_ids) | set(processor.tokenizer.convert_tokens_to_ids(
        list(processor.tokenizer.get_added_vocab())))
    model.generation_config.suppress_tokens = sorted(specials - {EOS_ID})
    return model, processor
