"""Stage-2 batches grouped by image: the questions about one image share one pass over its prefix.

Every demo prompt starts with the same tokens, BOS and the image's placeholder tokens, and only then
the question ("<image>question: ... answer:"). Trained one row per question, the decoder spends ~85% of
its tokens re-reading the same image prefix for each of the ~12 questions asked about that image. Here a
step runs the decoder once over each image's prefix, gives every question of that image a copy of the
prefix's KV cache, and runs only the question and answer tokens, with positions continuing after the
prefix. The loss is the one full sequences give (`tests/tools/demo/test_demo_grouped.py` checks it against
`collate`), at about a quarter of the tokens per question, so a step can hold ~190 questions instead of
64. That is what finally grounded the yes/no questions (docs/default-model.md).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from eas_tools.demo.data import IGNORE_INDEX, EasyVQATensors, Split


def questions_by_image(split: Split) -> dict[int, list[int]]:
    """Index into `pixels` -> rows of `split` asking about that image."""
    groups: dict[int, list[int]] = defaultdict(list)
    for row, image in enumerate(split.image_index.tolist()):
        groups[image].append(row)
    return dict(groups)


def shared_prefix_length(split: Split, image_token_id: int) -> int:
    """Length of the token prefix every prompt of `split` shares; it must contain all image tokens."""
    first = split.question_ids[0]
    length = len(first)
    for ids in split.question_ids[1:]:
        length = next((k for k, (a, b) in enumerate(zip(first[:length], ids, strict=False)) if a != b),
                      min(length, len(ids)))
    if image_token_id in first[length:]:
        raise ValueError("prompts differ before the last image token; grouped batches need a common image prefix")
    return length


def grouped_loss(model: nn.Module, data: EasyVQATensors, split: Split, groups: list[tuple[int, list[int]]],
                 prefix_length: int, pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Mean cross-entropy over answer and EOS tokens of all rows in `groups` ((image, rows) pairs), and
    the rows in batch order."""
    images = torch.tensor([image for image, _ in groups])
    prefix = torch.tensor(split.question_ids[groups[0][1][0]][:prefix_length]).expand(len(groups), prefix_length)
    cache = model.model(input_ids=prefix, pixel_values=data.pixels[images], use_cache=True).past_key_values
    rows = [row for _, members in groups for row in members]
    owner = torch.tensor([k for k, (_, members) in enumerate(groups) for _ in members])
    cache.batch_select_indices(owner)  # each row gets its image's keys and values (differentiable indexing)

    suffixes = [split.question_ids[r][prefix_length:] + split.answer_ids[r] for r in rows]
    width = max(len(s) for s in suffixes)
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in suffixes])
    mask = torch.tensor([[1] * (prefix_length + len(s)) + [0] * (width - len(s)) for s in suffixes])
    positions = torch.arange(prefix_length, prefix_length + width).expand(len(rows), width)
    hidden = model.model(input_ids=input_ids, past_key_values=cache, attention_mask=mask,
                         position_ids=positions).last_hidden_state
    logits = model.lm_head(hidden)

    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for k, row in enumerate(rows):
        start = len(split.question_ids[row]) - prefix_length - 1  # where the first answer token is predicted
        answer = split.answer_ids[row]
        labels[k, start : start + len(answer)] = torch.tensor(answer)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return loss, rows
