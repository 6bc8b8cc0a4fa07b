"""The readers on the dataset copies people actually have: an unbalanced quote that would swallow later rows, video
folders with empty files, folders and broken links where videos should be, names in other letter case, narrations
of invisible characters; each found at construction (no video is decoded) and named by file and row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from egovlp_deploy.data import CharadesEgoDataset, DataError, EgoClipDataset, EgoMCQDataset, EpicMIRDataset
from egovlp_deploy.data.egoclip import EGOCLIP_COLUMNS, read_segments_by_uid
from egovlp_deploy.data.epic import read_sentences

EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
)
CHARADES_TRAIN_HEADER = "id\tcls\tt_start\tt_end\tnarration"


def egoclip_line(uid="vid_a", text="#C C opens the drawer", start=0.5, end=2.5) -> str:
    return "\t".join(map(str, [uid, 700.0, "narration_pass_1", 0, 1.0, start, end, text, "[3]", "[0]"]))


def epic_line(nid="P01_01_0", vid="P01_01", text="open drawer") -> str:
    return f"{nid},P01,{vid},00:00:01.00,00:00:00.50,00:00:02.50,5,25,{text},open,3,drawer,8,['drawer'],[8]"


def write_egoclip(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(["\t".join(EGOCLIP_COLUMNS), *lines]) + "\n")
    return path


def no_reader(*args, **kwargs):
    raise AssertionError("a video was decoded")


def placeholder(path: Path) -> Path:
    """A non-empty file where a video should be: construction checks only that it is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded at construction")
    return path


def egoclip(csv: Path, root: Path, strict: bool = True) -> EgoClipDataset:
    return EgoClipDataset(csv, root, num_frames=2, size=16, strict=strict, clip_reader=no_reader)


# -- an unbalanced quote -----------------------------------------------------------------------------------------
def test_an_unbalanced_quote_in_an_egoclip_narration_does_not_swallow_the_rows_after_it(tmp_path):
    # csv.reader reads from the quote to the next one as one field: lines 4-5 would become part of line 3's
    # narration, and the row would take line 6's tags, in strict mode too
    placeholder(tmp_path / "v" / "vid_a" / "0.mp4")
    lines = [egoclip_line(text="good"), egoclip_line(text='"hi'), egoclip_line(text="lost one")]
    lines += [egoclip_line(text="lost two"), egoclip_line(text='says "ok"'), egoclip_line(text="after")]
    csv = write_egoclip(tmp_path / "egoclip.csv", lines)
    for strict in (True, False):
        with pytest.raises(DataError, match=r"egoclip.csv: line 3: a quoted field runs on to line 6 \(an unbalanced"):
            egoclip(csv, tmp_path / "v", strict)


def test_an_unbalanced_quote_in_an_epic_narration_does_not_swallow_the_rows_after_it(tmp_path):
    placeholder(tmp_path / "v" / "P01" / "P01_01.MP4")
    lines = [epic_line("P01_01_0"), epic_line("P01_01_1", text='"open'), epic_line("P01_01_2")]
    lines += [epic_line("P01_01_3", text='open "x"'), epic_line("P01_01_4")]
    csv = tmp_path / "EPIC_100_retrieval_test.csv"
    csv.write_text("\n".join([EPIC_HEADER, *lines]) + "\n")
    for strict in (True, False):
        with pytest.raises(DataError, match=r"line 3: a quoted field runs on to line 5"):
            EpicMIRDataset(csv, tmp_path / "v", 2, 16, strict=strict, clip_reader=no_reader)


def test_an_unbalanced_quote_in_a_segments_file_is_named(tmp_path):
    path = tmp_path / "segments.tsv"
    path.write_text('video_uid\tclip_start\tclip_end\tclip_text\nv\t0\t1\t"a\nv\t1\t2\tb\nv\t2\t3\tc"\n')
    with pytest.raises(DataError, match=r"line 2: a quoted field runs on to line 4"):
        read_segments_by_uid(path)


def test_a_quoted_narration_on_its_own_line_is_still_read(tmp_path):
    # a quoted field that closes on its line (a TAB inside a narration, as pandas writes it) stays one row
    placeholder(tmp_path / "v" / "vid_a" / "0.mp4")
    csv = write_egoclip(tmp_path / "egoclip.csv", [egoclip_line(text='"a\tb"'), egoclip_line(text="c")])
    assert egoclip(csv, tmp_path / "v").narrations() == ["a\tb", "c"]


# -- video folders -----------------------------------------------------------------------------------------------
def broken_chunks(root: Path) -> dict[str, str]:
    """{video_uid: the expected message} for chunk files that exist in name only."""
    (root / "empty").mkdir(parents=True)
    (root / "empty" / "0.mp4").write_bytes(b"")  # what an interrupted copy or download leaves
    (root / "folder" / "0.mp4").mkdir(parents=True)
    (root / "loop").mkdir()
    os.symlink("0.mp4", root / "loop" / "0.mp4")  # a link to itself
    (root / "dangling").mkdir()
    os.symlink(root / "elsewhere" / "0.mp4", root / "dangling" / "0.mp4")
    return {
        "empty": "bad video file: .*empty/0.mp4 is empty \\(0 bytes\\)",
        "folder": "bad video file: .*folder/0.mp4 is a folder, not a video file",
        "loop": "missing video: .*loop/0.mp4 is a symbolic link to nothing",
        "dangling": "missing video: .*dangling/0.mp4 is a symbolic link to nothing",
    }


def test_unusable_chunk_files_are_found_before_any_video_is_read(tmp_path):
    # an empty chunk used to pass the existence check and stop a strict run at its row, hours into an epoch
    root = tmp_path / "v"
    placeholder(root / "vid_a" / "0.mp4")
    for uid, message in broken_chunks(root).items():
        csv = write_egoclip(tmp_path / f"{uid}.csv", [egoclip_line(), egoclip_line(uid=uid)])
        with pytest.raises(DataError, match=f"line 3: {message}"):
            egoclip(csv, root)
        lax = egoclip(csv, root, strict=False)
        assert len(lax) == 1 and [line for line, _ in lax.skipped_rows] == [3], uid


def test_an_empty_charades_video_is_found_at_construction(tmp_path):
    placeholder(tmp_path / "v" / "AB12EGO.mp4")
    (tmp_path / "v" / "CD34EGO.mp4").write_bytes(b"")
    csv = tmp_path / "metadata_train.csv"
    csv.write_text(f"{CHARADES_TRAIN_HEADER}\nAB12EGO\t3\t1.0\t2.0\topen door\nCD34EGO\t4\t1.0\t2.0\tclose door\n")
    with pytest.raises(DataError, match=r"line 3: bad video file: .*CD34EGO.mp4 is empty \(0 bytes\)"):
        CharadesEgoDataset(csv, tmp_path / "v", 2, 16, split="train", clip_reader=no_reader)
    lax = CharadesEgoDataset(csv, tmp_path / "v", 2, 16, split="train", strict=False, clip_reader=no_reader)
    assert len(lax) == 1 and dict(lax.skip_counts) == {"bad video file": 1}


def test_a_video_name_in_other_letter_case_is_pointed_out(tmp_path):
    # the official layout names P01/P01_01.MP4; copies re-encoded by hand often end in .mp4
    placeholder(tmp_path / "v" / "P01" / "P01_01.mp4")
    csv = tmp_path / "EPIC_100_retrieval_test.csv"
    csv.write_text("\n".join([EPIC_HEADER, epic_line()]) + "\n")
    with pytest.raises(DataError, match=r"P01_01.MP4 does not exist \(P01_01.mp4 is there: .*other letter case\)"):
        EpicMIRDataset(csv, tmp_path / "v", 2, 16, clip_reader=no_reader)


def test_an_uncut_ego4d_video_is_pointed_out(tmp_path):
    # Ego4D ships whole videos (ROOT/<uid>.mp4); EgoClip reads them cut into 600 s chunks (ROOT/<uid>/<n>.mp4)
    placeholder(tmp_path / "v" / "vid_a.mp4")
    csv = write_egoclip(tmp_path / "egoclip.csv", [egoclip_line()])
    with pytest.raises(DataError, match=r"vid_a/0.mp4 does not exist \(vid_a.mp4 is there, uncut: .*600 s chunks"):
        egoclip(csv, tmp_path / "v")


def test_lax_mode_with_no_usable_row_says_why(tmp_path):
    # every row skipped (a wrong --video-root, say): the error names the first row's problem, not just a count
    csv = write_egoclip(tmp_path / "egoclip.csv", [egoclip_line(), egoclip_line()])
    with pytest.raises(DataError, match=r"no usable row \(2 skipped; the first, line 2: missing video: .*does not"):
        egoclip(csv, tmp_path / "nowhere", strict=False)


# -- narrations --------------------------------------------------------------------------------------------------
INVISIBLE = "\u200b\ufeff"  # a zero-width space and a byte-order mark: the encoder would get bytes that show nothing


def test_a_narration_of_invisible_characters_is_an_empty_narration(tmp_path):
    placeholder(tmp_path / "v" / "vid_a" / "0.mp4")
    placeholder(tmp_path / "v" / "P01" / "P01_01.MP4")
    placeholder(tmp_path / "v" / "AB12EGO.mp4")
    csv = write_egoclip(tmp_path / "egoclip.csv", [egoclip_line(), egoclip_line(text=INVISIBLE)])
    with pytest.raises(DataError, match="line 3: empty narration: .*has no visible character"):
        egoclip(csv, tmp_path / "v")
    assert egoclip(csv, tmp_path / "v", strict=False).skip_counts == {"empty narration": 1}

    epic = tmp_path / "EPIC_100_retrieval_test.csv"
    epic.write_text("\n".join([EPIC_HEADER, epic_line(), epic_line("P01_01_1", text=INVISIBLE)]) + "\n")
    with pytest.raises(DataError, match="line 3: empty narration: .*has no visible character"):
        EpicMIRDataset(epic, tmp_path / "v", 2, 16, clip_reader=no_reader)
    sentences = tmp_path / "EPIC_100_retrieval_test_sentence.csv"
    sentences.write_text(f"narration_id,narration\nP01_01_0,open drawer\nP01_01_1,{INVISIBLE}\n")
    with pytest.raises(DataError, match="line 3: expected 2 fields, .* with a visible character"):
        read_sentences(sentences)

    charades = tmp_path / "metadata_train.csv"
    rows = ["AB12EGO\t3\t1.0\t2.0\topen door", f"AB12EGO\t4\t1.0\t2.0\t{INVISIBLE}"]
    charades.write_text("\n".join([CHARADES_TRAIN_HEADER, *rows]) + "\n")
    with pytest.raises(DataError, match="line 3: empty narration: .*has no visible character"):
        CharadesEgoDataset(charades, tmp_path / "v", 2, 16, split="train", clip_reader=no_reader)


def test_a_good_copy_still_loads_with_every_check(tmp_path):
    root = tmp_path / "v"
    placeholder(root / "vid_a" / "0.mp4")
    placeholder(root / "vid_a" / "1.mp4")
    os.symlink(root / "vid_a", root / "vid_b")  # a video folder linked from elsewhere is fine
    lines = [egoclip_line(text="caf\u00e9 \u2014 ok"), egoclip_line(uid="vid_b", text="spans", start=599.0, end=601.0)]
    ds = egoclip(write_egoclip(tmp_path / "egoclip.csv", lines), root)
    assert ds.narrations() == ["caf\u00e9 \u2014 ok", "spans"] and ds.skipped_rows == []


def test_an_egomcq_file_with_a_byte_order_mark_is_read(tmp_path):
    # json.load refuses a BOM ("Unexpected UTF-8 BOM"); the CSV readers already drop it
    placeholder(tmp_path / "v" / "vid_a" / "0.mp4")
    row = dict(video_uid="vid_a", video_dur=30.0, clip_start=1.0, clip_end=2.0, tag_verb="[1]", tag_noun="[2]")
    question = {
        "types": 1,
        "query": row | {"clip_text": "#C C picks up the cup"},
        "choices": {str(k): row | {"clip_text": "x"} for k in range(5)},
        "answer": 2,
    }
    path = tmp_path / "egomcq.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"0": question}).encode())
    ds = EgoMCQDataset(path, tmp_path / "v", num_frames=2, size=16, clip_reader=no_reader)
    assert [(e.key, e.text, e.answer) for e in ds.entries] == [("0", "#C C picks up the cup", 2)]


def test_a_sentence_with_an_unquoted_comma_is_not_cut_short(tmp_path):
    # "open drawer, then close it" unquoted reads as 3 fields: the sentence would silently be "open drawer"
    path = tmp_path / "EPIC_100_retrieval_test_sentence.csv"
    path.write_text("narration_id,narration\nP01_01_0,open drawer, then close it\nP01_01_1,close tap\n")
    with pytest.raises(DataError, match=r"line 2: expected 2 fields.*quoted if it holds a comma"):
        read_sentences(path)
    path.write_text('narration_id,narration\nP01_01_0,"open drawer, then close it"\nP01_01_1,close tap\n')
    assert read_sentences(path) == (["P01_01_0", "P01_01_1"], ["open drawer, then close it", "close tap"])


def test_an_unbalanced_quote_in_the_sentences_does_not_swallow_the_sentences_after_it(tmp_path):
    path = tmp_path / "EPIC_100_retrieval_test_sentence.csv"
    path.write_text('narration_id,narration\nP01_01_0,"open\nP01_01_1,close tap\nP01_01_2,wash "cup"\nP01_01_3,x\n')
    with pytest.raises(DataError, match=r"line 2: a quoted field runs on to line 4 \(an unbalanced quote\?\)"):
        read_sentences(path)


def test_an_unbalanced_quote_that_runs_past_the_field_size_limit_is_fatal(tmp_path):
    # csv.reader gives up on the field at 128 KiB and goes on after it: the rows it had read into it were lost,
    # recorded as one skipped row in lax mode
    placeholder(tmp_path / "v" / "vid_a" / "0.mp4")
    lines = [egoclip_line(text="good"), egoclip_line(text='"open')]
    lines += [egoclip_line(text=f"row {i}") for i in range(3000)]
    csv = write_egoclip(tmp_path / "egoclip.csv", lines)
    with pytest.raises(DataError, match=r"line 3: a quoted field runs on to line \d+ \(field larger than field limit"):
        egoclip(csv, tmp_path / "v", strict=False)


def test_a_control_character_in_a_video_id_shows_in_the_message(tmp_path):
    # a NUL byte (a block of a damaged file) or an escape sequence would print invisibly or drive the terminal
    placeholder(tmp_path / "v" / "vid_a" / "0.mp4")
    csv = write_egoclip(tmp_path / "egoclip.csv", [egoclip_line(), egoclip_line(uid="vid\x00a\x1b[2J")])
    with pytest.raises(DataError, match=r"line 3: missing video: .*/vid\\x00a\\x1b\[2J/0.mp4 does not exist"):
        egoclip(csv, tmp_path / "v")
