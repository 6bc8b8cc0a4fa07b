"""From dataset items to a `StepBatch` (pre-training: scene negatives interleaved, tokenised, MLM-masked) or a
`FinetuneBatch` (fine-tuning: clips, tokenised captions and their relevancy).

All randomness is seeded per pair by (seed, epoch, dataset index, positive/negative), never by the global RNG, so a
batch is the same however many processes or workers build it and whether or not the run was resumed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from egovlp_deploy.data.egoclip import SharedEpoch

from .objectives import FinetuneBatch, StepBatch


class IndexedDataset(Dataset):
    """Returns (index, item), so the collator can seed per-item randomness by dataset index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]


def pair_seed(seed: int, epoch: int, index: int, negative: bool) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + 2 * index + int(negative)) % (2**63 - 1)


class PretrainCollator:
    """Tokenises as the official trainer (padding to max_length, truncation) and masks 15% of tokens for MLM with
    `transformers.DataCollatorForLanguageModeling` (80% <mask>, 10% random, 10% kept; special tokens never)."""

    def __init__(self, tokenizer, max_length: int = 15, mlm_probability: float = 0.15, seed: int = 0):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self._epoch = SharedEpoch()  # the collator runs in the DataLoader workers, which persist across epochs
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def mask(self, input_ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues
            # a CUDA seeding with a captured stack trace, which costs more than the masking itself
            out = self.masker([{"input_ids": input_ids.tolist()}])
        return out["input_ids"][0], out["labels"][0]

    def __call__(self, items) -> StepBatch:
        videos, texts, verbs, nouns, seeds, failures, epoch = [], [], [], [], [], 0, self.epoch
        for index, item in items:
            failures += int(item.get("load_failed", 0))
            for negative, suffix in ((False, ""), (True, "_neg")):
                if negative and "video_neg" not in item:
                    continue
                videos.append(item["video" + suffix])
                texts.append(item["text" + suffix])
                verbs.append(item["verb" + suffix])
                nouns.append(item["noun" + suffix])
                seeds.append(pair_seed(self.seed, epoch, index, negative))
        enc = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        masked = [self.mask(ids, s) for ids, s in zip(enc["input_ids"], seeds)]
        return StepBatch(
            video=torch.stack(videos),
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            verb=torch.stack(verbs),
            noun=torch.stack(nouns),
            mlm_input_ids=torch.stack([m[0] for m in masked]),
            mlm_labels=torch.stack([m[1] for m in masked]),
            load_failures=torch.tensor(failures),
        )


class FinetuneCollator:
    """Fine-tuning items (EpicMIRDataset / CharadesEgoDataset) -> a `FinetuneBatch`: captions tokenised as the
    official fine-tuning trainers (padding to max_length: 30 for EK-100, 15 for Charades-Ego; truncation), the
    relevancy of each caption (`relation`; 1 where the dataset has none). Deterministic: nothing to seed."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def set_epoch(self, epoch: int) -> None:  # the loop's collator interface; the items carry their own seeds
        pass

    def __call__(self, items) -> FinetuneBatch:
        items = [item for _, item in items]
        enc = self.tokenizer(
            [it["text"] for it in items],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return FinetuneBatch(
            video=torch.stack([it["video"] for it in items]),
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            relation=torch.tensor([float(it.get("relation", 1.0)) for it in items]),
            load_failures=torch.tensor(sum(int(it.get("load_failed", 0)) for it in items)),
        )
