"""Visual question answering with numpy only (no torch): questions in, answers out, for
clients and servers that run an exported stacked_attention_vqa.

`encode_questions` turns question text into the model's `question` and
`question_lengths` inputs with the model's question vocabulary (the vocab-source.json
saved beside the export), padded with <pad> to the longest question of the batch.
Questions are never truncated: with `max_len`, a longer one raises InputError.
`check_questions` validates id inputs made some other way before they are sent (ONNX
Runtime's own error for an id outside the vocabulary names no input). `top_answers`
turns the answer logits into the k most likely answers with their softmax
probabilities, named when the answer list (the top-K answers the model was trained on,
in class order) is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnserve.errors import AttnserveError, InputError
from attnserve.imaging import top_k
from attnserve.text import Vocabulary


@dataclass(frozen=True)
class Answer:
    """One candidate answer: its text (the class id as text without an answer list), its
    class id and its softmax probability."""

    text: str
    answer_id: int
    score: float


def encode_questions(questions: Sequence[str], vocab: Vocabulary, *, max_len: int | None = None,
                     strict: bool = False) -> dict[str, np.ndarray]:
    """Question texts -> {"question": (B, W) int64 ids padded with <pad>, "question_lengths":
    (B,) int64}, W the longest question's word count.

    Words outside the vocabulary become <unk> (or raise with `strict`). No <bos> or <eos>:
    the question model reads the words alone.

    Raises:
        InputError: no questions, an empty question, an unknown word with `strict`, or a
            question of more than `max_len` words.
    """
    if isinstance(questions, str) or not questions:
        raise InputError("expected a non-empty list of question strings")
    try:
        ids = [vocab.encode(q, add_eos=False, strict=strict) for q in questions]
    except AttnserveError as e:
        raise InputError(str(e)) from None
    if max_len is not None:
        long = [(i, len(q)) for i, q in enumerate(ids) if len(q) > max_len]
        if long:
            i, n = long[0]
            raise InputError(f"question {i} has {n} words, more than the maximum of {max_len}; shorten it "
                             "(questions are not truncated)")
    width = max(len(q) for q in ids)
    question = np.full((len(ids), width), vocab.pad_id, dtype=np.int64)
    for row, q in zip(question, ids, strict=True):
        row[: len(q)] = q
    return {"question": question, "question_lengths": np.array([len(q) for q in ids], dtype=np.int64)}


def check_questions(question: np.ndarray, question_lengths: np.ndarray, vocab_size: int) -> None:
    """Raise InputError (naming every problem) unless `question` is (B, W) int64 ids in
    [0, vocab_size) and `question_lengths` (B,) int64 in [1, W]."""
    question, lengths = np.asarray(question), np.asarray(question_lengths)
    problems = []
    if question.ndim != 2 or lengths.ndim != 1 or lengths.shape[0] != question.shape[0]:
        raise InputError(f"question must be (batch, words) and question_lengths (batch,), got "
                         f"{question.shape} and {lengths.shape}")
    if question.dtype != np.int64 or lengths.dtype != np.int64:
        problems.append(f"question and question_lengths must be int64, got {question.dtype} and "
                        f"{lengths.dtype}")
    bad = np.unique(question[(question < 0) | (question >= vocab_size)])
    if bad.size:
        problems.append(f"question ids must be in [0, {vocab_size}) (the question vocabulary), got "
                        f"{bad[:8].tolist()}")
    bad = lengths[(lengths < 1) | (lengths > question.shape[1])]
    if bad.size:
        problems.append(f"question_lengths must be in [1, {question.shape[1]}], got {bad[:8].tolist()}")
    if problems:
        raise InputError("; ".join(problems))


def top_answers(logits: np.ndarray, k: int = 5, answers: Sequence[str] | None = None) -> list[list[Answer]]:
    """Answer logits (B, A) -> per question the k most likely answers, most likely first
    (softmax over the A answers, as eq. 23 of the paper)."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise InputError(f"expected answer logits of shape (batch, answers), got {logits.shape}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if answers is not None and len(answers) != logits.shape[1]:
        raise InputError(f"{len(answers)} answers given for a model of {logits.shape[1]}")
    scores, ids = top_k(logits, min(k, logits.shape[1]))
    return [[Answer(answers[i] if answers is not None else str(i), int(i), float(s))
             for s, i in zip(row_s, row_i, strict=True)] for row_s, row_i in zip(scores, ids, strict=True)]
