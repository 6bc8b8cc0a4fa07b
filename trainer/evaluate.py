"""EgoMCQ evaluation in the three modes of the official validation:
dual (cosine of the projected embeddings), fusion (VTM match probability), and ensemble (their sum).
Zero-shot EK-100 multi-instance retrieval (nDCG, mAP) and Charades-Ego action recognition (mAP over the class
prompts) on their official test files, with the dual encoder at the official evaluation frame counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from egovlp_deploy.checkpoint import resize_temporal_embed
from egovlp_deploy.losses import sim_matrix
from egovlp_deploy.metrics import charades_map, egomcq_accuracy, mir_metrics
from egovlp_deploy.model import EgoVLPv2

MODES = ("dual", "fusion", "ensemble")


def model_at_frames(model: EgoVLPv2, num_frames: int) -> EgoVLPv2:
    """The same weights with the temporal embedding resized to `num_frames` by the official rule."""
    if num_frames == model.config.video.num_frames:
        return model
    state = dict(model.state_dict())
    state["video_model.temporal_embed"] = resize_temporal_embed(state["video_model.temporal_embed"], num_frames)
    other = EgoVLPv2(model.config.with_num_frames(num_frames)).to(model.cls_token.device)
    other.load_state_dict(state)
    return other.eval()


def _collate(items):
    return ([it["text"] for it in items], torch.stack([it["videos"] for it in items]),
            torch.tensor([it["answer"] for it in items]), torch.tensor([it["type"] for it in items]))


@torch.no_grad()
def score_questions(model: EgoVLPv2, tokenizer, texts: list[str], videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores (Q, C) of each mode for Q questions with C candidate clips each; videos (Q, C, F, 3, S, S)."""
    q, c = videos.shape[:2]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")  # dynamic length, as official
    ids, mask = enc["input_ids"].to(videos.device), enc["attention_mask"].to(videos.device)
    clips = videos.flatten(0, 1)  # (Q*C, F, 3, S, S)
    text_emb = model.encode_text(ids, mask)  # (Q, P)
    video_emb = model.encode_video(clips).view(q, c, -1)  # (Q, C, P)
    dual = torch.stack([sim_matrix(text_emb[i:i + 1], video_emb[i])[0] for i in range(q)])  # (Q, C)
    logits = model.fuse(clips, ids.repeat_interleave(c, 0), mask.repeat_interleave(c, 0)).vtm_logits
    fusion = F.softmax(logits.float(), dim=-1)[:, 1].view(q, c)
    return {"dual": dual.float(), "fusion": fusion, "ensemble": dual.float() + fusion}


def evaluate_egomcq(model: EgoVLPv2, dataset, tokenizer, device, batch_size: int = 4, num_workers: int = 0,
                    max_questions: int | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """{'dual'|'fusion'|'ensemble': {'Inter-video': %, 'Intra-video': %}}; questions are sharded over ranks."""
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset) if max_questions is None else min(max_questions, len(dataset))))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    loader = DataLoader(Subset(dataset, indices[rank::world]), batch_size=batch_size, collate_fn=_collate,
                        num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="EgoMCQ", leave=False)
    local = {m: [] for m in MODES} | {"answer": [], "type": []}
    for texts, videos, answers, types in loader:
        scores = score_questions(model, tokenizer, texts, videos.to(device))
        for m in MODES:
            local[m].append(scores[m].cpu())
        local["answer"].append(answers)
        local["type"].append(types)
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in local.items()}
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, local)
        local = {k: torch.cat([s[k] for s in shards if s[k].numel()]) for k in local}
    model.train(was_training)
    return {m: egomcq_accuracy(local[m], local["answer"], local["type"]) for m in MODES}


# -- EK-100 MIR and Charades-Ego (zero-shot, dual encoder) ---------------------------------------------------------
EPIC_FRAMES = 16  # the official EK-100 MIR evaluation config's num_frames
CHARADES_FRAMES = 32  # the official Charades-Ego evaluation config's num_frames
CHARADES_TEXT_LENGTH = 30  # class prompts are padded / truncated to 30 tokens, as official


def _clip_batches(dataset, batch_size: int, num_workers: int, progress: bool, desc: str):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)  # dataset order, no shuffling
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    return loader


def epic_test_dataset(annotations, video_root, num_frames: int, size: int, strict: bool = True):
    """The EK-100 MIR test split from the official retrieval annotation directory: EPIC_100_retrieval_test.csv,
    EPIC_100_retrieval_test_sentence.csv and relevancy/caption_relevancy_EPIC_100_retrieval_test.npy (or .npz: the
    official .pkl converted once, as egovlp_deploy/data/epic.py describes)."""
    from pathlib import Path

    from egovlp_deploy.data.epic import EpicMIRDataset
    from egovlp_deploy.data.errors import DataError

    root = Path(annotations)
    stem = root / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test"
    relevancy = next((stem.with_suffix(s) for s in (".npy", ".npz") if stem.with_suffix(s).is_file()), None)
    if relevancy is None:
        raise DataError(stem.with_suffix(".npy"), "file", "missing (the official .pkl is read only once converted "
                                                          "to .npy, as egovlp_deploy/data/epic.py describes)")
    return EpicMIRDataset(root / "EPIC_100_retrieval_test.csv", video_root, num_frames, size, split="test",
                          sentence_csv=root / "EPIC_100_retrieval_test_sentence.csv", relevancy_path=relevancy,
                          strict=strict)


def charades_test_dataset(annotations, video_root, num_frames: int, size: int, num_classes: int = 157,
                          strict: bool = True):
    """The Charades-Ego test split from the official annotation directory: CharadesEgo_v1_test_only1st.csv and
    Charades_v1_classes.txt (the class prompts, `dataset.prompts`)."""
    from pathlib import Path

    from egovlp_deploy.data.charades import CharadesEgoDataset

    root = Path(annotations)
    return CharadesEgoDataset(root / "CharadesEgo_v1_test_only1st.csv", video_root, num_frames, size, split="test",
                              classes_path=root / "Charades_v1_classes.txt", num_classes=num_classes, strict=strict)


@torch.no_grad()
def evaluate_epic_mir(model: EgoVLPv2, dataset, tokenizer, device, batch_size: int = 16, num_workers: int = 0,
                      progress: bool = False) -> dict[str, float]:
    """Zero-shot EK-100 multi-instance retrieval: {'nDCG_V2T', 'nDCG_T2V', 'nDCG_AVG', 'mAP_V2T', 'mAP_T2V',
    'mAP_AVG'} in percent (`metrics.mir_metrics`).

    As the official validation: every test clip gives a video embedding (segment-middle frames) and its narration a
    text embedding (dynamic padding, truncated to the model's text length), both projected by the dual encoder; the
    cosine matrix (texts x videos) in dataset order is scored against the relevancy matrix, each sentence by the
    caption of the first clip with its narration id. Rows skipped in lax mode leave the matrix with their relevancy
    rows, and sentences whose clip was skipped leave it with their columns.
    """
    import numpy as np

    if dataset.relevancy is None or dataset.sentence_ids is None:
        raise ValueError("EK-100 MIR evaluation needs the dataset's sentence CSV and relevancy matrix")
    was_training = model.training
    model.eval()
    texts, videos = [], []
    for batch in _clip_batches(dataset, batch_size, num_workers, progress, "EK-100 MIR"):
        enc = tokenizer(batch["text"], padding=True, truncation=True, max_length=model.config.text.max_text_length,
                        return_tensors="pt")
        texts.append(model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
        videos.append(model.encode_video(batch["video"].to(device)).float().cpu())
    model.train(was_training)
    usable = set(dataset.narration_ids)
    keep = [j for j, nid in enumerate(dataset.sentence_ids) if nid in usable]
    relevancy = dataset.relevancy[dataset.row_indices][:, keep]
    similarity = sim_matrix(torch.cat(texts), torch.cat(videos))
    return mir_metrics(similarity, np.arange(len(dataset)), relevancy, dataset.narration_ids,
                       [dataset.sentence_ids[j] for j in keep])


@torch.no_grad()
def evaluate_charades(model: EgoVLPv2, dataset, tokenizer, device, prompts: list[str] | None = None,
                      batch_size: int = 16, num_workers: int = 0, progress: bool = False) -> dict[str, float]:
    """Zero-shot Charades-Ego action recognition: {'mAP': percent} (`metrics.charades_map` x 100).

    As the official validation: each class name (`prompts`, default `dataset.prompts`: Charades_v1_classes.txt from
    character 5 on) is embedded by the dual text encoder, padded / truncated to 30 tokens; each test video (the
    whole video, 'uniform' frames) by the dual video encoder; a video's class scores are the cosine similarities.
    """
    prompts = dataset.prompts if prompts is None else prompts
    if not prompts:
        raise ValueError("Charades-Ego evaluation needs the class prompts (the dataset's classes_path)")
    was_training = model.training
    model.eval()
    length = min(CHARADES_TEXT_LENGTH, model.config.text.max_text_length)
    enc = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    classes = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu()
    videos, targets = [], []
    for batch in _clip_batches(dataset, batch_size, num_workers, progress, "Charades-Ego"):
        videos.append(model.encode_video(batch["video"].to(device)).float().cpu())
        targets.append(batch["target"])
    model.train(was_training)
    scores = sim_matrix(classes, torch.cat(videos)).T  # (videos, classes)
    return {"mAP": 100 * charades_map(scores, torch.cat(targets))}


def format_retrieval(name: str, result: dict[str, float]) -> str:
    """One line per metric, as 'name  metric  value'."""
    return "\n".join(f"{name:<12}{metric:<10}{value:>8.2f}" for metric, value in result.items())


# -- command line ---------------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a save_pretrained directory, a training checkpoint (runs/x/checkpoints/step_N) or an "
                             "official .pth file")
    parser.add_argument("--egomcq", metavar="JSON", help="EgoMCQ questions (official format)")
    parser.add_argument("--video-root", metavar="DIR",
                        help="EgoMCQ's chunked videos: DIR/{video_uid}/{chunk}.mp4 (needed with --egomcq)")
    parser.add_argument("--epic-mir", metavar="DIR",
                        help="zero-shot EK-100 multi-instance retrieval on the test split of this retrieval "
                             "annotation directory: EPIC_100_retrieval_test.csv, EPIC_100_retrieval_test_sentence.csv, "
                             "relevancy/caption_relevancy_EPIC_100_retrieval_test.npy (the .pkl converted once)")
    parser.add_argument("--epic-video-root", metavar="DIR",
                        help="EK-100 videos: DIR/{participant_id}/{video_id}.MP4 (default: DIR/videos of --epic-mir)")
    parser.add_argument("--charades", metavar="DIR",
                        help="zero-shot Charades-Ego action recognition on the test split of this annotation "
                             "directory: CharadesEgo_v1_test_only1st.csv and Charades_v1_classes.txt (the prompts)")
    parser.add_argument("--charades-video-root", metavar="DIR",
                        help="Charades-Ego videos: DIR/{id}.mp4 (default: DIR/videos of --charades)")
    parser.add_argument("--charades-classes", type=int, default=157, metavar="N",
                        help="number of classes in Charades_v1_classes.txt (default: 157)")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="tokenizer directory (a training run keeps its demo tokenizer in RUN/tokenizer)")
    parser.add_argument("--frames", type=int, metavar="F",
                        help=f"frames per clip for every benchmark (default: the model's for EgoMCQ, paper: 16; "
                             f"{EPIC_FRAMES} for EK-100 MIR and {CHARADES_FRAMES} for Charades-Ego, as the official "
                             f"evaluation configs)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="Q",
                        help="EgoMCQ questions, or EK-100 / Charades-Ego clips, per step (default: 4)")
    parser.add_argument("--max-questions", type=int, metavar="N", help="evaluate only the first N questions")
    parser.add_argument("--lax", action="store_true", help="black frames instead of an error for unreadable videos")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON: EgoMCQ's alone, else {'egomcq', 'epic_mir', 'charades'} "
                             "for the benchmarks run")


def run(args) -> int:
    import json
    from pathlib import Path

    from egovlp_deploy.config import check_num_frames
    from egovlp_deploy.data.egomcq import EgoMCQDataset
    from egovlp_deploy.tokenizer import load_tokenizer

    check_benchmark_arguments(args)  # before the model is loaded
    if args.frames is not None:
        check_num_frames(args.frames, "--frames")  # before the model is loaded or resized to that many frames
    path = Path(args.model)
    model = (EgoVLPv2.from_pretrained(path) if path.is_dir()
             else EgoVLPv2.from_official_checkpoint(path, num_frames=args.frames))
    frames = args.frames or model.config.video.num_frames
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model = model_at_frames(model, frames).to(device)
    tokenizer, size, strict = load_tokenizer(args.tokenizer), model.config.video.img_size, not args.lax
    results, report = {}, []
    if args.egomcq:
        dataset = EgoMCQDataset(args.egomcq, args.video_root, frames, size, strict=strict)
        results["egomcq"] = evaluate_egomcq(model, dataset, tokenizer, device, args.batch_size,
                                            max_questions=args.max_questions, progress=not args.json)
        report += [f"EgoMCQ on {len(dataset) if args.max_questions is None else args.max_questions} questions, "
                   f"{frames} frames", format_table(results["egomcq"])]
    if args.epic_mir:
        epic_frames = args.frames or EPIC_FRAMES
        dataset = epic_test_dataset(args.epic_mir, args.epic_video_root or Path(args.epic_mir, "videos"),
                                    epic_frames, size, strict=strict)
        results["epic_mir"] = evaluate_epic_mir(model_at_frames(model, epic_frames), dataset, tokenizer, device,
                                                args.batch_size, progress=not args.json)
        report += [f"EK-100 MIR (zero-shot) on {len(dataset)} clips, {epic_frames} frames, dual encoder, percent",
                   format_retrieval("epic_mir", results["epic_mir"])]
    if args.charades:
        charades_frames = args.frames or CHARADES_FRAMES
        dataset = charades_test_dataset(args.charades, args.charades_video_root or Path(args.charades, "videos"),
                                        charades_frames, size, args.charades_classes, strict=strict)
        results["charades"] = evaluate_charades(model_at_frames(model, charades_frames), dataset, tokenizer, device,
                                                batch_size=args.batch_size, progress=not args.json)
        report += [f"Charades-Ego (zero-shot) on {len(dataset)} videos, {args.charades_classes} classes, "
                   f"{charades_frames} frames, dual encoder, percent",
                   format_retrieval("charades", results["charades"])]
    if args.json:
        print(json.dumps(results["egomcq"] if list(results) == ["egomcq"] else results, indent=2))
    else:
        print("\n".join(report))
    return 0


def check_benchmark_arguments(args) -> None:
    """At least one benchmark, with the inputs it needs (ValueError: the CLI prints it and exits 2)."""
    if not (args.egomcq or args.epic_mir or args.charades):
        raise ValueError("nothing to evaluate: give --egomcq, --epic-mir and/or --charades")
    if args.egomcq and not args.video_root:
        raise ValueError("--egomcq needs --video-root (the chunked EgoClip videos)")
    if args.charades_classes < 1:
        raise ValueError(f"--charades-classes must be positive, got {args.charades_classes}")


def format_table(result: dict) -> str:
    lines = [f"{'mode':<10}{'inter %':>9}{'intra %':>9}"]
    for mode, r in result.items():
        lines.append(f"{mode:<10}{r.get('Inter-video', float('nan')):>9.1f}{r.get('Intra-video', float('nan')):>9.1f}")
    return "\n".join(lines)
