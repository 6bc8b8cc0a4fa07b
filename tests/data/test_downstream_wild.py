"""EK-100 MIR and Charades-Ego test splits as real annotation files come: sentences shared by many clips, rows whose
video is missing, files saved by other tools, duplicated or unlabelled rows; and the metrics on them, by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from egovlp_deploy.data import CharadesEgoDataset, DataError, EpicMIRDataset
from egovlp_deploy.evaluation import evaluate_epic_mir, skipped_note
from egovlp_deploy.metrics import mir_metrics, mir_scores
from oracle_encoder import OracleEncoder

EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
)
CHARADES_HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def epic_row(nid: str, text: str, vid: str = "P01_01") -> str:
    return f"{nid},P01,{vid},00:00:01.00,00:00:00.50,00:00:02.50,5,25,{text},open,3,drawer,8,\"['drawer']\",[8]"


def epic_files(tmp: Path, rows: list[str], sentences: list[tuple[str, str]], relevancy, sentence_header=None):
    """The three test-split files and a video folder holding P01/P01_01.MP4 (never decoded: a stub reads clips)."""
    (tmp / "videos" / "P01").mkdir(parents=True, exist_ok=True)
    (tmp / "videos" / "P01" / "P01_01.MP4").write_bytes(b"a video")
    csv = tmp / "EPIC_100_retrieval_test.csv"
    csv.write_text("\n".join([EPIC_HEADER, *rows]) + "\n")
    sent = tmp / "EPIC_100_retrieval_test_sentence.csv"
    lines = [sentence_header or "narration_id,narration"] + [f"{i},{t}" for i, t in sentences]
    sent.write_text("\n".join(lines) + "\n")
    rel = tmp / "relevancy.npy"
    np.save(rel, np.asarray(relevancy, dtype=np.float32))
    return csv, sent, rel


def epic_set(csv, sent, rel, strict=True) -> EpicMIRDataset:
    return EpicMIRDataset(
        csv,
        csv.parent / "videos",
        num_frames=2,
        size=16,
        sentence_csv=sent,
        relevancy_path=rel,
        strict=strict,
        clip_reader=lambda path, start, stop, frames, jitter, rng=None: torch.zeros(
            (frames, 16, 16, 3), dtype=torch.uint8
        ),
    )


# -- EK-100 MIR ----------------------------------------------------------------------------------------------------
def test_lax_evaluation_scores_a_shared_sentence_whose_own_clip_is_skipped(tmp_path):
    """Real EK-100 sentences are shared: "open drawer" is sentence P01_01_0 and clips 0 and 1 both say it. With clip
    0's video missing (lax), the sentence was left out with its clip, which left clip 1 with no sentence of
    relevancy 1: the whole evaluation failed after encoding every clip (and a lax fine-tuning run with it at the end
    of its first epoch). It is now embedded from its sentence-CSV text."""
    rows = [epic_row("P01_01_0", "open drawer", vid="P01_99"), epic_row("P01_01_1", "open drawer")]
    rows.append(epic_row("P01_01_2", "close tap"))
    sentences = [("P01_01_0", "open drawer"), ("P01_01_2", "close tap")]
    ds = epic_set(*epic_files(tmp_path, rows, sentences, [[1, 0], [1, 0], [0, 1]]), strict=False)
    assert len(ds) == 2 and ds.skip_counts == {"missing video": 1}
    encoder = OracleEncoder.showing(["open drawer", "close tap"], ["open drawer", "close tap"])
    result = evaluate_epic_mir(encoder, ds, encoder.tokenizer, "cpu", batch_size=1)
    assert result == {k: 100.0 for k in ("nDCG_V2T", "nDCG_T2V", "nDCG_AVG", "mAP_V2T", "mAP_T2V", "mAP_AVG")}
    assert ds.scored_sentences.tolist() == [0, 1] and ds.sentence_items == [None, 1]
    note = skipped_note("EK-100 MIR", ds)
    assert note.startswith("note: EK-100 MIR: 1 of 3 test rows skipped (missing video: 1)") and "sentences" not in note


def test_lax_evaluation_leaves_out_a_sentence_with_no_clip_left_and_says_so(tmp_path):
    rows = [epic_row("P01_01_0", "open drawer", vid="P01_99"), epic_row("P01_01_1", "close tap")]
    ds = epic_set(
        *epic_files(tmp_path, rows, [("P01_01_0", "open drawer"), ("P01_01_1", "close tap")], np.eye(2)), False
    )
    assert ds.scored_sentences.tolist() == [1] and ds.sentence_items == [0]
    encoder = OracleEncoder.showing(["open drawer", "close tap"], ["close tap"])
    assert evaluate_epic_mir(encoder, ds, encoder.tokenizer, "cpu")["mAP_AVG"] == 100.0
    assert "1 of 2 sentences not scored" in skipped_note("EK-100 MIR", ds)


def test_strict_sentence_id_that_names_no_row_is_an_error_before_any_clip_is_read(tmp_path):
    """Before, the sentence was dropped from the metrics without a word (or failed them after every clip was
    encoded), as a sentence CSV of another split or version would be."""
    rows = [epic_row("P01_01_0", "open drawer"), epic_row("P01_01_1", "close tap")]
    files = epic_files(tmp_path, rows, [("P01_01_0", "open drawer"), ("P01_01_7", "close tap")], np.eye(2))
    with pytest.raises(DataError, match=r"_sentence\.csv: narration_id: 1 sentence ids name no row .*P01_01_7"):
        epic_set(*files)


def test_test_row_without_a_sentence_of_relevancy_1_is_a_bad_row(tmp_path):
    """Its average precision is 0/0: found when the split is read, not after every clip is encoded."""
    rows = [epic_row("P01_01_0", "open drawer"), epic_row("P01_01_1", "close tap")]
    files = epic_files(tmp_path, rows, [("P01_01_0", "open drawer"), ("P01_01_1", "close tap")], [[1, 0], [0, 0.5]])
    with pytest.raises(DataError, match=r"retrieval_test\.csv: line 3: no relevant sentence: row 1 of the relevancy"):
        epic_set(*files)
    ds = epic_set(*files, strict=False)  # lax: the row goes, and its sentence, with no clip left to find, too
    assert len(ds) == 1 and ds.skip_counts == {"no relevant sentence": 1} and ds.scored_sentences.tolist() == [0]


def test_strict_sentence_without_any_clip_of_relevancy_1_is_an_error(tmp_path):
    rows = [epic_row("P01_01_0", "open drawer"), epic_row("P01_01_1", "open drawer")]
    files = epic_files(tmp_path, rows, [("P01_01_0", "open drawer"), ("P01_01_1", "shut drawer")], [[1, 0.5]] * 2)
    with pytest.raises(DataError, match=r"relevancy\.npy: column 1: sentence 'P01_01_1' has no clip of relevancy 1"):
        epic_set(*files)


@pytest.mark.parametrize("scale", [100.0, -1.0])
def test_relevancy_outside_0_1_is_refused(tmp_path, scale):
    """A matrix in percent has no entry of exactly 1 for mAP to count, and its nDCG gains are 100x: no meaning."""
    rows = [epic_row("P01_01_0", "open drawer"), epic_row("P01_01_1", "close tap")]
    files = epic_files(tmp_path, rows, [("P01_01_0", "open drawer"), ("P01_01_1", "close tap")], np.eye(2) * scale)
    with pytest.raises(DataError, match=r"relevancy values must be in \[0, 1\]"):
        epic_set(*files)


def test_sentence_csv_saved_with_a_pandas_index_is_read_by_column_name(tmp_path):
    """`df.to_csv(path)` writes the index as an unnamed first column: by position, the ids were the index and the
    sentences were the narration ids, which fine-tuning would then train on as captions."""
    rows = [epic_row("P01_01_0", "open drawer"), epic_row("P01_01_1", "close tap")]
    sentences = [("0,P01_01_0", "open drawer"), ("1,P01_01_1", "close tap")]
    ds = epic_set(*epic_files(tmp_path, rows, sentences, np.eye(2), sentence_header=",narration_id,narration"))
    assert ds.sentence_ids == ["P01_01_0", "P01_01_1"] and ds.sentences == ["open drawer", "close tap"]


def test_mir_scores_by_hand_with_graded_relevancy_and_a_tie():
    """2 clips x 2 sentences. Clip 1 ties its two sentences: nDCG ranks with argsort(s)[::-1] (sentence 1 first),
    mAP with argsort(-s) (sentence 0 first), as the official: its AP is then (0.5 + 1) / 2 at k = 2 = 0.75."""
    sim = np.array([[0.9, 0.1], [0.8, 0.8]], np.float32)
    rel = np.array([[1, 0.5], [0.5, 1]], np.float32)
    got = mir_scores(sim, rel)
    assert got["nDCG_V2T"] == pytest.approx(100) and got["nDCG_T2V"] == pytest.approx(100)
    assert got["mAP_V2T"] == pytest.approx(87.5) and got["mAP_T2V"] == pytest.approx(100)
    assert got["mAP_AVG"] == pytest.approx(93.75)
    # the same as the official-layout entry point (texts x videos, sentences by narration id)
    assert mir_metrics(sim.T, np.arange(2), rel, ["a", "b"], ["a", "b"]) == got
    with pytest.raises(ValueError, match="NaN similarities"):
        mir_scores(np.where(np.eye(2, dtype=bool), np.nan, sim), rel)


# -- Charades-Ego --------------------------------------------------------------------------------------------------
def charades_row(vid: str, actions: str) -> str:
    return f'{vid},S1,Kitchen,6,7,Yes,"A person.",door,"Opens.","{actions}",30.5'


def charades_set(tmp: Path, rows: list[str], strict=True) -> CharadesEgoDataset:
    for vid in ("AB12EGO", "CD34EGO"):
        (tmp / f"{vid}.mp4").write_bytes(b"a video")
    csv = tmp / "CharadesEgo_v1_test_only1st.csv"
    csv.write_text("\n".join([CHARADES_HEADER, *rows]) + "\n")
    return CharadesEgoDataset(csv, tmp, num_frames=2, size=16, num_classes=4, strict=strict)


def test_charades_duplicate_test_id_is_a_bad_row(tmp_path):
    """The same video twice counted twice in every class's AP (the official even gives both the later labels)."""
    rows = [
        charades_row("AB12EGO", "c001 0 1"),
        charades_row("CD34EGO", "c002 0 1"),
        charades_row("AB12EGO", "c003 0 1"),
    ]
    with pytest.raises(DataError, match=r"line 4: duplicate id: 'AB12EGO' is on line 2 already"):
        charades_set(tmp_path, rows)
    ds = charades_set(tmp_path, rows, strict=False)
    assert len(ds) == 2 and ds.skip_counts == {"duplicate id": 1} and ds[0]["target"].tolist() == [0, 1, 0, 0]


def test_charades_test_split_without_any_action_is_an_error_before_any_video_is_read(tmp_path):
    with pytest.raises(DataError, match="no usable row names an action"):
        charades_set(tmp_path, [charades_row("AB12EGO", ""), charades_row("CD34EGO", "")])
    # a row with an unknown class is skipped in lax mode; the one left has no action: the same error, not mAP 0/0
    with pytest.raises(DataError, match="no usable row names an action"):
        charades_set(tmp_path, [charades_row("AB12EGO", ""), charades_row("CD34EGO", "c009 0 1")], strict=False)
