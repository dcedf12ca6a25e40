"""Tokenisation for the sequence models: a small, real vocabulary saved beside a model.

Word-level (whitespace, lower-cased, punctuation split off) and character-level
vocabularies share one class. Ids 0-3 are reserved: <pad>, <bos>, <eos>, <unk>. Text
outside the vocabulary maps to <unk> (or raises, with `strict=True`); the served model
turns text into ids and ids into text with the same file. No torch, no downloads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from attnserve.errors import AttnserveError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Vocabulary:
    """An id <-> token table.

    Attributes:
        tokens: the table; tokens[i] is id i; the first four are the special tokens.
        level: "word" or "char".
    """

    tokens: tuple[str, ...]
    level: str = "word"

    def __post_init__(self):
        if self.level not in ("word", "char"):
            raise AttnserveError(f"vocabulary level must be 'word' or 'char', got {self.level!r}")
        if tuple(self.tokens[:4]) != SPECIALS:
            raise AttnserveError(f"a vocabulary starts with {SPECIALS}, got {tuple(self.tokens[:4])}")
        if len(set(self.tokens)) != len(self.tokens):
            raise AttnserveError("a vocabulary may not hold a token twice")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, texts: Iterable[str], level: str = "word", min_count: int = 1,
              max_size: int | None = None) -> Vocabulary:
        """Collect the tokens of `texts`, most frequent first (ties alphabetical)."""
        counts = Counter(t for text in texts for t in cls._split(text, level))
        ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIALS))]
        return cls(SPECIALS + tuple(ranked), level)

    @staticmethod
    def _split(text: str, level: str) -> list[str]:
        return _WORD.findall(text.lower()) if level == "word" else list(text)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = True,
               strict: bool = False) -> list[int]:
        """Text -> ids. Unknown tokens become <unk>, or raise with `strict`."""
        pieces = self._split(text, self.level)
        if not pieces:
            raise AttnserveError("cannot encode empty text (nothing but whitespace)")
        ids = []
        for p in pieces:
            i = self._ids.get(p)
            if i is None:
                if strict:
                    raise AttnserveError(
                        f"{p!r} is not in the {self.level}-level vocabulary of {len(self)} tokens"
                    )
                i = self.unk_id
            ids.append(i)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Ids -> text; stops at the first <eos>."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self):
                raise AttnserveError(f"token id {i} is outside the vocabulary of {len(self)} tokens")
            if i == self.eos_id:
                break
            if skip_special and i < len(SPECIALS):
                continue
            out.append(self.tokens[i])
        if self.level == "char":
            return "".join(out)
        return re.sub(r" (?=[^\w\s])", "", " ".join(out))  # no space before punctuation

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"level": self.level, "tokens": list(self.tokens)}
        path.write_text(json.dumps(data, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            data = json.loads(Path(path).read_text())
            return cls(tuple(data["tokens"]), data["level"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise AttnserveError(
                f"{path} is not an attnserve vocabulary file ({type(e).__name__}: {e})"
            ) from None
