"""easy-vqa as tensors: every image encoded once, every prompt tokenised once.

Training then only indexes tensors, which is what makes a from-scratch LLaVA trainable on two CPU
cores in minutes. Splits are by image: validation images are held out of the TRAIN split (seeded);
the test split is never touched here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import ProcessorMixin

from eas.model.prompting import build_prompt

IGNORE_INDEX = -100


def corpus(repeats: int = 20) -> list[str]:
    """Text the demo tokenizer is trained on: the questions and the answers, answers repeated so that each
    becomes a single token (" red", " circle", ...): a one-token answer is a 13-way choice at the first
    generated position, where a spelled-out answer had to be produced piece by piece."""
    import easy_vqa

    questions, _, _ = easy_vqa.get_train_questions()
    answers = easy_vqa.get_answers()
    lines = sorted(set(questions))
    lines += [f"question: {q} answer: {a}" for q in lines[:20] for a in answers]
    lines += [" ".join(f" {a}" for a in answers)] * repeats * 10
    return lines


@dataclass
class Split:
    question_ids: list[list[int]]  # prompt ids per row (image tokens expanded)
    answer_ids: list[list[int]]  # answer + EOS per row
    image_index: torch.Tensor  # [rows] index into `pixels`
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.answers)


@dataclass
class EasyVQATensors:
    pixels: torch.Tensor  # [images, 3, H, W], processor-normalised
    image_ids: list[int]  # easy-vqa image id of each row of `pixels`
    train: Split
    validation: Split


def answer_ids(processor: ProcessorMixin, answer: str) -> list[int]:
    tok = processor.tokenizer
    return [*tok(" " + answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]


def load_train_tensors(processor: ProcessorMixin, val_images: int = 200, seed: int = 0) -> EasyVQATensors:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    ids = sorted(paths)
    held = set(random.Random(seed).sample(ids, val_images))
    images = [Image.open(paths[i]).convert("RGB") for i in ids]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    position = {image_id: k for k, image_id in enumerate(ids)}
    blank = Image.new("RGB", images[0].size)
    prompts = {q: processor(text=[build_prompt(processor, q)], images=[blank])["input_ids"][0]
               for q in set(questions)}
    targets = {a: answer_ids(processor, a) for a in set(answers)}

    def split(keep: bool) -> Split:
        rows = [(q, a, i) for q, a, i in zip(questions, answers, image_ids, strict=True) if (i in held) == keep]
        return Split(
            question_ids=[list(prompts[q]) for q, _, _ in rows],
            answer_ids=[targets[a] for _, a, _ in rows],
            image_index=torch.tensor([position[i] for _, _, i in rows]),
            questions=[q for q, _, _ in rows],
            answers=[a for _, a, _ in rows],
        )

    return EasyVQATensors(pixels=pixels, image_ids=ids, train=split(False), validation=split(True))


def collate(data: EasyVQATensors, split: Split, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + answer, right padded; loss only on the answer and EOS."""
    sequences = [split.question_ids[r] + split.answer_ids[r] for r in rows]
    labels = [[IGNORE_INDEX] * len(split.question_ids[r]) + split.answer_ids[r] for r in rows]
    width = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
        "pixel_values": data.pixels[split.image_index[rows]],
    }
