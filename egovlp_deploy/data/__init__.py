"""Dataset readers for the official EgoVLPv2 file formats (EgoClip, EgoMCQ, EK-100 MIR, Charades-Ego).

Each reader validates every metadata row at construction and follows one bad-data policy: strict (the default)
raises `DataError` naming the file and row; lax skips bad rows (`skipped_rows`, `skip_counts`) and turns unreadable
videos into the official black clip (`failures`, and `load_failed` in each item).
"""

from .charades import CharadesEgoDataset, load_charades_classes, parse_actions
from .egoclip import EgoClipDataset, multi_hot, parse_tag_list
from .egomcq import EgoMCQDataset
from .epic import EpicMIRDataset, load_relevancy, read_sentences
from .errors import DataError

__all__ = [
    "DataError",
    "EgoClipDataset",
    "EgoMCQDataset",
    "EpicMIRDataset",
    "CharadesEgoDataset",
    "load_charades_classes",
    "parse_actions",
    "parse_tag_list",
    "multi_hot",
    "load_relevancy",
    "read_sentences",
]
