"""Test helper: a perfect dual encoder for the downstream evaluations, which scores 100 exactly when they keep
texts, videos and labels aligned (its `tokenizer` is its own: a text's id is its position in `texts`)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class OracleEncoder(torch.nn.Module):
    """Embeds a text as the one-hot of its narration, and the k-th video it sees as the one-hot of the k-th
    expected label set: a perfect encoder, if the evaluation keeps texts, videos and labels aligned."""

    def __init__(self, texts: list[str], video_labels: list[list[int]]):
        super().__init__()
        self.texts, self.video_labels, self.seen = texts, video_labels, 0
        self.config = SimpleNamespace(text=SimpleNamespace(max_text_length=64))

    def tokenizer(self, texts, **_):
        ids = torch.tensor([[self.texts.index(t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_text(self, ids, mask):
        return torch.nn.functional.one_hot(ids[:, 0], len(self.texts)).float()

    def encode_video(self, video):
        labels = self.video_labels[self.seen : self.seen + len(video)]
        self.seen += len(video)
        out = torch.zeros(len(video), len(self.texts))
        for row, classes in enumerate(labels):
            out[row, classes] = 1.0
        return out

    @classmethod
    def showing(cls, texts: list[str], video_texts: list[str]) -> OracleEncoder:
        """The oracle whose k-th video is the one-hot of the text `video_texts[k]`."""
        return cls(texts, [[texts.index(t)] for t in video_texts])
