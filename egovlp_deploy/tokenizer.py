"""RoBERTa byte-level BPE tokenizers: the real one from a local directory, or a small demo one trained here.

Nothing is downloaded unless the caller names a hub id and passes `allow_download=True`.
The demo tokenizer keeps RoBERTa's special-token layout (<s>=0, <pad>=1, </s>=2, <unk>=3, then <mask>) and its
post-processing (`<s> text </s>`), so code written against roberta-base works unchanged with it.
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .errors import error_line
from .path_text import printable

ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
DEMO_VOCAB_SIZE = 1000


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or does not fit the model."""


def is_tokenizer_dir(path: str | os.PathLike) -> bool:
    """A saved fast (tokenizer.json) or BPE (vocab.json) tokenizer lives in `path`."""
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


def tokenizer_beside(checkpoint: str | os.PathLike) -> Path | None:
    """The tokenizer a training run keeps beside its checkpoints: RUN/tokenizer, found from a checkpoint path at
    most three folders down (RUN/checkpoints/step_N)."""
    p = Path(checkpoint)
    return next((q / "tokenizer" for q in (p, *p.parents[:3]) if is_tokenizer_dir(q / "tokenizer")), None)


def load_tokenizer(name_or_path: str | os.PathLike, allow_download: bool = False):
    """A `transformers` fast tokenizer from a local directory (or a hub id when `allow_download`), padding and
    truncating on the right whatever its files say."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).is_dir()
    if not local and not allow_download:
        raise TokenizerError(
            f"{name_or_path}: no such tokenizer directory (hub ids are only fetched with allow_download=True)"
        )
    if local:
        _check_tokenizer_files(Path(name_or_path))
    try:
        # trust_remote_code=False: a tokenizer_config.json whose `auto_map` names a Python module (in the folder or
        # on the hub) would otherwise make transformers ask on stdin whether to run it, and run it on a "y"
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), use_fast=True, local_files_only=not allow_download, trust_remote_code=False
        )
    except Exception as exc:  # malformed files raise TypeError, AttributeError, KeyError as well
        # one line: transformers' messages run over several, the reason often on the last
        detail = " ".join(str(exc).split()) if isinstance(exc, (OSError, ValueError)) else error_line(exc)
        raise TokenizerError(f"{printable(str(name_or_path))}: cannot load a tokenizer ({detail})") from exc
    limit = tokenizer.model_max_length
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise TokenizerError(
            f"{printable(str(name_or_path))}: model_max_length {limit!r} in its tokenizer_config.json is not a "
            "whole number of 1 or more"
        )
    tokenizer.model_max_length = limit
    # The text embedding is the state of the first token (<s>): left padding would put <pad> there, and left
    # truncation would keep a long query's end, where a truncation report shows its start.
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    return tokenizer


# A tokenizer file's size limit, here and in what an export copies: roberta-base's are under 2 MiB.
TOKENIZER_MAX_BYTES = 64 << 20
# The suffixes of the files a Hugging Face / demo tokenizer folder holds: what an export copies and what identifies a
# tokenizer folder by content (an export's task checks, a resumable evaluation).
TOKENIZER_SUFFIXES = (".json", ".txt", ".model")
# The files of a tokenizer folder that transformers reads whole (a sentencepiece tokenizer's is NAME.model).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "config.json",
)


def _check_tokenizer_files(folder: Path) -> None:
    """TokenizerError for a tokenizer file in `folder` larger than an export copies: transformers reads each whole
    into memory (and parses a tokenizer.json into several times its size)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise TokenizerError(f"{printable(str(folder))}: cannot list the tokenizer folder ({exc.strerror})") from exc
    for path in entries:
        if not (path.name in _TOKENIZER_FILES or path.suffix == ".model") or not path.is_file():
            continue  # transformers reads regular files only
        size = path.stat().st_size
        if size > TOKENIZER_MAX_BYTES:
            raise TokenizerError(
                f"{printable(str(path))}: {size} bytes, more than a tokenizer file may hold "
                f"({TOKENIZER_MAX_BYTES >> 20} MiB; roberta-base's are under 2 MiB)"
            )


def check_savable_path(path: str | os.PathLike, what: str) -> None:
    """TokenizerError unless a tokenizer can be saved under `path`: Hugging Face tokenizers takes file names as
    UTF-8 text, so a path whose bytes are not UTF-8 (decoded to surrogates by Python) fails its save."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise TokenizerError(
            f"{shown}: not valid UTF-8; {what} (Hugging Face tokenizers) cannot be saved under it. Give a folder "
            "whose path is UTF-8"
        ) from None


def train_demo_tokenizer(out_dir: str | os.PathLike, texts: list[str] | None = None, vocab_size: int = DEMO_VOCAB_SIZE):
    """Train a byte-level BPE on `texts` (default: the synthetic world's narrations), save it, and return it."""
    check_savable_path(out_dir, "the demo tokenizer")
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    from .vocabulary import corpus

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, lowercase=False)
    bpe.train_from_iterator(
        texts or corpus(),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(ROBERTA_SPECIALS),
        show_progress=False,
    )
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    for i, token in enumerate(ROBERTA_SPECIALS):
        assert bpe.token_to_id(token) == i, "special tokens must keep RoBERTa's ids"
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Save into a sibling temp dir, then rename: a reader never sees half a tokenizer.
    from .checkpoint import make_temp_dir

    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        tokenizer.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return tokenizer


def check_tokenizer_fits(
    tokenizer, vocab_size: int, pad_token_id: int, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> None:
    """Raise if the tokenizer would emit ids the model's embedding table does not have (its largest id counts, not
    its length: a vocabulary may skip ids), pads with another id, or, given the model's <s> and </s> ids, does not
    frame a text as `<s> text </s>` with them (the dual text embedding is the state of the first token)."""
    if len(tokenizer) > vocab_size:
        raise TokenizerError(f"tokenizer has {len(tokenizer)} tokens, the model's vocabulary only {vocab_size}")
    token, top = max(tokenizer.get_vocab().items(), key=lambda item: item[1], default=("", -1))
    if top >= vocab_size:
        raise TokenizerError(
            f"tokenizer gives the token {printable(token)!r} the id {top}, the model's vocabulary only {vocab_size} "
            f"(ids 0..{vocab_size - 1})"
        )
    if tokenizer.pad_token_id is None:
        raise TokenizerError(
            f"tokenizer has no pad token (the model pads with id {pad_token_id}; a tokenizer.json without its "
            "tokenizer_config.json names no special tokens)"
        )
    if tokenizer.pad_token_id != pad_token_id:
        raise TokenizerError(f"tokenizer pad id {tokenizer.pad_token_id} differs from the model's {pad_token_id}")
    # byte-level BPE (RoBERTa's) has a token for every byte: <unk> for plain words means another kind of tokenizer
    # (a WordPiece tokenizer_class over a BPE vocabulary, say) that maps what it does not know to one id
    sample = "#C C picks up the cup"
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in tokenizer(sample)["input_ids"]:
        shown = " ".join(printable(t) for t in tokenizer.tokenize(sample))
        raise TokenizerError(
            f"tokenizer encodes {sample!r} with <unk> tokens ({shown!r}): not the byte-level BPE of RoBERTa (check "
            "tokenizer_class in tokenizer_config.json)"
        )
    if bos_token_id is None and eos_token_id is None:
        return
    ids = tokenizer("a")["input_ids"]
    bos_ok = bos_token_id is None or (ids and ids[0] == bos_token_id)
    if not (bos_ok and (eos_token_id is None or (ids and ids[-1] == eos_token_id))):
        shown = " ".join(printable(t) for t in tokenizer.convert_ids_to_tokens(ids))
        raise TokenizerError(
            f"tokenizer encodes 'a' as {shown!r} (ids {ids}); the model's texts start with id {bos_token_id} (<s>, "
            f"whose state is the text embedding) and end with id {eos_token_id} (</s>): wrong special tokens or no "
            "post-processor in tokenizer.json?"
        )


@dataclass(frozen=True)
class Truncation:
    """A text longer than the model's token limit: what is encoded of it."""

    text: str
    tokens: int  # the whole text's length in tokens, special tokens included
    limit: int
    kept: str  # the text the first `limit` tokens stand for

    def message(self) -> str:
        """One line: the kept words and the start of the dropped ones. A cut inside a character (byte-level BPE
        splits an emoji or a CJK character into several tokens) shows the kept part up to the last whole character;
        control and format characters (escape sequences, newlines, direction overrides) are shown as escapes."""
        kept = self.kept
        if not self.text.startswith(kept):
            kept = kept.rstrip("\ufffd")  # the decoded bytes of a partly kept character
        dropped = self.text[len(kept) :].strip() if self.text.startswith(kept) else ""
        if len(dropped) > 60:
            dropped = dropped[:57] + "..."
        rest = f'; not encoded: "{printable(dropped)}"' if dropped else ""
        kept = printable(kept.strip())
        return f'query truncated to {self.limit} tokens: "{kept}" ({self.tokens} tokens given{rest})'


# Code points that are not controls, format characters or separators and still show nothing: Unicode's
# Default_Ignorable_Code_Point letters and marks (Hangul fillers, the combining grapheme joiner, Khmer inherent vowels,
# Mongolian and other variation selectors) and the blank Braille pattern, the usual stand-ins for an empty name.
_BLANK_RANGES = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x2800, 0x2800),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xE0100, 0xE01EF),
)


def _blank(c: str) -> bool:
    return any(lo <= ord(c) <= hi for lo, hi in _BLANK_RANGES)


def has_visible_character(text: str) -> bool:
    """Whether `text` shows anything: a character that is not a control, format (zero-width, BOM, direction mark),
    surrogate, private-use or unassigned code point, nor a space, separator or other blank (a Hangul filler, a
    variation selector). A query or narration of none gives the encoder byte tokens that stand for nothing."""
    return any(unicodedata.category(c)[0] not in "CZ" and not _blank(c) for c in text)


def truncated_texts(tokenizer, texts: list[str], max_length: int) -> list[Truncation]:
    """The texts that tokenize to more than `max_length` tokens (special tokens included), each with its kept part."""
    if not texts:
        return []
    # verbose=False: no transformers log line about sequences longer than the model's maximum, counted on purpose
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]
    out = []
    for text, n in zip(texts, lengths):
        if n > max_length:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=tokenizer.is_fast)
            kept = tokenizer.decode(enc["input_ids"], skip_special_tokens=True)
            if "offset_mapping" in enc and not kept.endswith("\ufffd"):
                # the text the kept tokens stand for, as given: their decoding lowercases it where a normalizer
                # does, and leaves out the name of a special token written in it ("<mask>")
                kept = text[: max((end for _, end in enc["offset_mapping"]), default=0)]
            out.append(Truncation(text, n, max_length, kept))
    return out
