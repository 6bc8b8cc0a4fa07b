"""The collator's per-pair MLM masks are a pure function of (seed, epoch, index), also in persistent workers."""

import torch

from egovlp_deploy.tokenizer import load_tokenizer
from egovlp_deploy.trainer.batching import IndexedDataset, PretrainCollator

NARRATIONS = [
    "#C C picks up the red cup",
    "#C C puts down the blue box",
    "#C C opens the green jar",
    "#C C pushes the yellow bowl",
] * 2


class Narrations(torch.utils.data.Dataset):
    def __len__(self):
        return len(NARRATIONS)

    def __getitem__(self, i):
        return {
            "video": torch.full((1, 3, 2, 2), float(i)),
            "text": NARRATIONS[i],
            "verb": torch.zeros(3),
            "noun": torch.zeros(3),
        }


def test_epoch_reaches_persistent_workers(demo_tokenizer_dir):
    collator = PretrainCollator(load_tokenizer(demo_tokenizer_dir), max_length=12, mlm_probability=0.5, seed=7)
    data = IndexedDataset(Narrations())
    loader = torch.utils.data.DataLoader(
        data, batch_size=len(data), collate_fn=collator, num_workers=1, persistent_workers=True
    )
    seen = []
    for epoch in (0, 1, 2):
        collator.set_epoch(epoch)
        from_worker = next(iter(loader))
        in_main = collator([data[i] for i in range(len(data))])
        assert torch.equal(from_worker.mlm_input_ids, in_main.mlm_input_ids), epoch
        seen.append(from_worker.mlm_input_ids)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])  # each epoch masks anew
