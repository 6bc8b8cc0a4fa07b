"""The readers on what real annotation files and hostile copies of them contain: byte-order marks, blank lines,
unclosed quotes, path components that leave the video root, signed timestamps, pickled or corrupt relevancy
matrices, deeply nested JSON; and the EK-100 metrics on NaN and empty inputs."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest

from egovlp_deploy.data import DataError, EgoMCQDataset, EpicMIRDataset, load_charades_classes, load_relevancy
from egovlp_deploy.data.csv_rows import csv_records
from egovlp_deploy.data.epic import read_sentences, timestamp_seconds
from egovlp_deploy.data.errors import RowFilter
from egovlp_deploy.metrics import mir_metrics

EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
)


def epic_line(nid="P01_01_0", pid="P01", vid="P01_01", start="00:00:00.50", stop="00:00:02.50", classes="[8]"):
    # a one-noun list needs no quotes: the line has no quote character of its own
    return f"{nid},{pid},{vid},00:00:01.00,{start},{stop},5,25,open drawer,open,3,drawer,8,['drawer'],{classes}"


def records(path, strict=True, required=("name",)):
    rows = RowFilter(path, strict)
    return [(line, position, fields) for line, position, fields in csv_records(path, rows, required)], rows


# -- CSV structure ---------------------------------------------------------------------------------------------
def test_a_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffname,value\r\nx,1\r\n".encode())  # a spreadsheet export: BOM and CRLF
    got, _ = records(path)
    assert got == [(2, 0, {"name": "x", "value": "1"})]


def test_blank_lines_are_no_rows_and_take_no_position(tmp_path):
    # pandas (the official reader, and the relevancy matrix's row numbering) skips blank lines
    path = tmp_path / "blank.csv"
    path.write_text("name,value\na,1\n\nb,2\n\n")
    got, rows = records(path, strict=False)
    assert [(line, position, f["name"]) for line, position, f in got] == [(2, 0, "a"), (4, 1, "b")]
    assert rows.skipped_rows == []
    got, _ = records(path, strict=True)  # a trailing blank line is no bad row either
    assert len(got) == 2


def test_an_unclosed_quote_in_the_last_column_is_fatal_in_lax_mode(tmp_path):
    # csv.reader would end the quoted field at the end of the file: one row holding every later line
    path = tmp_path / "epic.csv"
    lines = [epic_line("P01_01_0"), epic_line("P01_01_1", classes='"[8'), epic_line("P01_01_2"), epic_line("P01_01_3")]
    path.write_text("\n".join([EPIC_HEADER, *lines]) + "\n")
    with pytest.raises(DataError, match=r"line 3: a quoted field is not closed before the end of the file"):
        EpicMIRDataset(path, tmp_path, 2, 8, strict=False, check_files=False)


def test_a_repeated_required_column_is_fatal(tmp_path):
    # a second "narration" column (a cleaned copy appended to the file) would silently replace the first
    path = tmp_path / "epic.csv"
    path.write_text(EPIC_HEADER + ",narration\n" + epic_line() + ",cleaned\n")
    with pytest.raises(DataError, match=r"line 1: columns \['narration'\] appear more than once"):
        EpicMIRDataset(path, tmp_path, 2, 8, check_files=False)


def test_a_closed_multi_line_quoted_field_is_still_one_row(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('name,value\n"a\nb",1\nc,2\n')
    got, _ = records(path)
    assert [(line, position, f["name"]) for line, position, f in got] == [(3, 0, "a\nb"), (4, 1, "c")]


# -- EK-100 ------------------------------------------------------------------------------------------------------
def test_epic_participant_dotdot_does_not_leave_the_video_root(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    (tmp_path / "P01_01.MP4").write_bytes(b"x")  # a file just outside the root, where '..' would lead
    path = tmp_path / "epic.csv"
    path.write_text("\n".join([EPIC_HEADER, epic_line(pid="..")]) + "\n")
    with pytest.raises(DataError, match=r"line 2: bad participant_id: '\.\.'"):
        EpicMIRDataset(path, root, 2, 8)


@pytest.mark.parametrize("value", ["-00:00:01.00", "+00:00:01.00", "0_0:00:01.00", "00:00:1_0.5"])
def test_epic_timestamps_take_digits_only(value):
    # datetime2sec-style int()/float() parsing reads "-00:00:01.00" as +1 s
    with pytest.raises(ValueError, match="is not HH:MM:SS.ff"):
        timestamp_seconds(value, "start_timestamp")
    assert timestamp_seconds("01:02:03.089", "start_timestamp") == pytest.approx(3723.089)


def test_epic_sentence_csv_skips_blank_lines(tmp_path):
    path = tmp_path / "sentences.csv"
    path.write_text("narration_id,narration\nP01_01_0,open drawer\n\nP01_01_1,close tap\n\n")
    assert read_sentences(path) == (["P01_01_0", "P01_01_1"], ["open drawer", "close tap"])


class _Marker:
    """Unpickling it would create `path`: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_npz_member_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "relevancy.npz"
    np.savez(path, relevancy=np.array([[_Marker(marker)]], dtype=object))
    with pytest.raises(DataError, match="not a readable .npy/.npz without pickle"):
        load_relevancy(path)
    assert not marker.exists()
    # the official .pkl itself, renamed, is refused the same way
    pkl = tmp_path / "caption_relevancy.npy"
    pkl.write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(DataError, match="not a readable .npy/.npz without pickle"):
        load_relevancy(pkl)
    assert not marker.exists()


def test_a_corrupt_npz_is_a_data_error(tmp_path):
    not_zip = tmp_path / "a.npz"
    not_zip.write_bytes(b"PK\x03\x04" + bytes(100))
    not_npy = tmp_path / "b.npz"
    with zipfile.ZipFile(not_npy, "w") as z:
        z.writestr("relevancy.npy", b"not an array")
    empty = tmp_path / "c.npy"
    empty.write_bytes(b"")
    for path in (not_zip, not_npy, empty):
        with pytest.raises(DataError, match="not a readable .npy/.npz without pickle"):
            load_relevancy(path)


def test_a_complex_relevancy_matrix_is_refused(tmp_path):
    path = tmp_path / "r.npy"
    np.save(path, np.eye(2, dtype=np.complex128))
    with pytest.raises(DataError, match="expected a 2-D numeric matrix"):
        load_relevancy(path)


# -- Charades-Ego classes ----------------------------------------------------------------------------------------
def test_charades_classes_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "Charades_v1_classes.txt"
    path.write_bytes("\ufeffc000 Holding some clothes\r\nc001 Putting clothes somewhere\r\n".encode())
    assert load_charades_classes(path, 2) == ["Holding some clothes", "Putting clothes somewhere"]


def test_charades_classes_that_are_not_utf8_are_a_data_error(tmp_path):
    path = tmp_path / "Charades_v1_classes.txt"
    path.write_bytes(b"c000 Holding \xff clothes\n")
    with pytest.raises(DataError, match="unreadable text"):
        load_charades_classes(path, 1)


# -- EgoMCQ ------------------------------------------------------------------------------------------------------
def test_egomcq_nested_thousands_deep_is_a_data_error(tmp_path):
    path = tmp_path / "egomcq.json"
    path.write_text('{"0": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match="json: not valid JSON: nested too deeply"):
        EgoMCQDataset(path, tmp_path, 2, 8, check_files=False)
    json.loads('{"0": []}')  # the ordinary decoder still works afterwards


# -- EK-100 metrics ----------------------------------------------------------------------------------------------
IDS = ["a", "b", "c"]


def test_mir_metrics_refuses_nan_similarities():
    # unchecked, the NaN ranks first for nDCG and last for mAP: a 100 % mAP from a broken model
    sim = np.eye(3)
    sim[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN similarities"):
        mir_metrics(sim, np.arange(3), np.eye(3), IDS, IDS)


def test_mir_metrics_refuses_nan_relevancy_and_empty_input():
    rel = np.eye(3)
    rel[0, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite relevancy"):
        mir_metrics(np.eye(3), np.arange(3), rel, IDS, IDS)
    with pytest.raises(ValueError, match="no clips or no sentences"):
        mir_metrics(np.zeros((0, 0)), np.arange(0), np.zeros((0, 0)), [], [])


def test_mir_metrics_hand_computed_with_partial_relevancy():
    # 2 clips x 2 sentences; clip 0 ranks sentence 1 (rel 0.5) above sentence 0 (rel 1)
    sim = np.array([[0.0, 0.8], [0.9, 0.1]])  # rows texts, columns videos: sim[t, v]
    rel = np.array([[1.0, 0.5], [0.0, 1.0]])
    got = mir_metrics(sim, np.arange(2), rel, ["a", "b"], ["a", "b"])
    # video_by_sentence = sim.T = [[0, .9], [.8, .1]]
    # V2T clip 0: order [s1, s0], rels [.5, 1]: AP = (1.5 / 2) / 1 = .75; nDCG@2 = (.5 + 1/log2 3) / (1 + .5/log2 3)
    # V2T clip 1: order [s0, s1], rels [0, 1]: AP = (1 / 2) / 1 = .5; nDCG@1 = 0 / 1
    ndcg0 = (0.5 + 1 / np.log2(3)) / (1 + 0.5 / np.log2(3))
    assert got["mAP_V2T"] == pytest.approx(100 * (0.75 + 0.5) / 2)
    assert got["nDCG_V2T"] == pytest.approx(100 * (ndcg0 + 0) / 2)
    # T2V sentence 0: scores [0, .8], order [c1, c0], rels [0, 1]: AP .5; k = 1: nDCG 0
    # T2V sentence 1: scores [.9, .1], order [c0, c1], rels [.5, 1]: AP (1.5 / 2) = .75; nDCG as clip 0 above
    assert got["mAP_T2V"] == pytest.approx(100 * (0.5 + 0.75) / 2)
    assert got["nDCG_T2V"] == pytest.approx(100 * (0 + ndcg0) / 2)
