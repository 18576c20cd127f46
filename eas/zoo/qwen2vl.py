"""A tiny Qwen2-VL built in process, with hand-made inputs (its processor needs torchvision).

Used to check that EAS is exact on a second family whose q/k/v projections carry a bias and whose
positions are multimodal RoPE.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import BatchFeature, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 0, 1, 2, 3, 4, 5, 6
IMAGE_SIZE, PATCH, MERGE = 32, 8, 2


def build_qwen2vl(seed: int = 0, layers: int = 4) -> Qwen2VLForConditionalGeneration:
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            # mrope_section must sum to head_dim / 2 = 8
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def qwen2vl_inputs(images: list[Image.Image], prompts: list[list[int]]) -> BatchFeature:
    """A left-padded batch: <s> <vision_start> <image>×k <vision_end> prompt tokens."""
    processor = Qwen2VLImageProcessorPil(patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE,
                                         min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2)
    vision = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    rows = []
    for grid, prompt in zip(vision["image_grid_thw"], prompts, strict=True):
        n_image = int(grid.prod()) // MERGE**2
        rows.append([BOS_ID, VISION_START_ID, *[IMAGE_ID] * n_image, VISION_END_ID, *prompt])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return BatchFeature({
        "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_ID).long(),
        "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"],
    })
