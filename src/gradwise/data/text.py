"""``text``: character-level language modelling on a text file (by default, shipped Python docs prose)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from gradwise.data.bundle import DataBundle, DataInfo
from gradwise.data.common import check_int, check_val_fraction, existing_file
from gradwise.data.sources import DATASETS
from gradwise.errors import DataError

SHIPPED_TEXT = Path(__file__).parent / "files" / "python_reference.txt"


class TokenWindows(Dataset):
    """Windows over a 1-D token tensor: sample ``i`` is ``(tokens[t:t+T], tokens[t+1:t+T+1])``, ``t = i*stride``.

    Windows are views, so overlapping strides cost no memory.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int | None = None) -> None:
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride or seq_len
        self._len = max(0, (len(tokens) - seq_len - 1) // self.stride + 1)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows")
        t = index * self.stride
        return self.tokens[t : t + self.seq_len], self.tokens[t + 1 : t + self.seq_len + 1]


def encode_chars(text: str, vocab: str) -> torch.Tensor:
    """Token ids (int64) of ``text`` under a character vocabulary (``vocab[i]`` is token ``i``)."""
    index = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise DataError(f"characters not in the vocabulary: {missing[:10]}")
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def decode_chars(ids: torch.Tensor | list[int], vocab: str) -> str:
    """The text of token ids under a character vocabulary."""
    return "".join(vocab[int(i)] for i in ids)


@DATASETS.register("text")
def text(
    path: str | None = None,
    seq_len: int = 128,
    stride: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    encoding: str = "utf-8",
) -> DataBundle:
    """Next-character prediction on the text at ``path`` (default: ~150 KB of the Python language reference).

    The vocabulary is every character of the file, sorted; it is stored as a string in
    ``info.preprocessing["char_vocab"]`` for decoding. Train is the first ``1 - val_fraction`` of
    the text and validation the rest, contiguous, so no window crosses the boundary. Windows of
    ``seq_len`` step by ``stride`` (default ``seq_len``: no overlap). ``seed`` is accepted for a
    uniform interface; the split is deterministic and needs none.
    """
    del seed
    p = SHIPPED_TEXT if path is None else existing_file(path)
    seq_len = check_int(seq_len, "seq_len")
    stride = check_int(stride, "stride") if stride is not None else seq_len
    val_fraction = check_val_fraction(val_fraction)
    try:
        content = p.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not {encoding} text ({exc}); pass encoding=... ") from None
    vocab = "".join(sorted(set(content)))
    tokens = encode_chars(content, vocab)
    cut = int(len(tokens) * (1 - val_fraction))
    train = TokenWindows(tokens[:cut], seq_len, stride)
    val = TokenWindows(tokens[cut:], seq_len, stride) if val_fraction > 0 else None
    for part, ds in (("train", train), ("validation", val)):
        if ds is not None and len(ds) == 0:
            raise DataError(
                f"{p}: the {part} part ({len(ds.tokens)} characters) is shorter than seq_len + 1 = {seq_len + 1}; "
                "use a smaller seq_len, a longer text or another val_fraction"
            )
    info = DataInfo(
        name=p.stem,
        input_shape=(seq_len,),
        input_dtype="int64",
        target_shape=(seq_len,),
        target_dtype="int64",
        task="lm",
        vocab_size=len(vocab),
        seq_len=seq_len,
        n_train=len(train),
        n_val=len(val) if val is not None else 0,
        preprocessing={"char_vocab": vocab},
        notes=[
            f"{len(content)} characters: train {cut}, validation {len(content) - cut} (contiguous)"
        ],
    )
    return DataBundle(train, val, info)
