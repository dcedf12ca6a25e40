"""The vocabulary: round trips, unknown tokens, empty text, files."""

import pytest

from attnserve.errors import AttnserveError
from attnserve.text import SPECIALS, Vocabulary

CORPUS = ["a red circle left of a blue square.", "a blue square above a green triangle!"]


def test_word_vocabulary_round_trip(tmp_path):
    vocab = Vocabulary.build(CORPUS)
    assert vocab.tokens[:4] == SPECIALS and vocab.tokens[4] == "a"  # most frequent first
    ids = vocab.encode("A red circle left of a blue square.")
    assert ids[-1] == vocab.eos_id and vocab.unk_id not in ids
    assert vocab.decode(ids) == "a red circle left of a blue square."
    again = Vocabulary.load(vocab.save(tmp_path / "vocab.json"))
    assert again == vocab and again.encode("a green circle") == vocab.encode("a green circle")


def test_char_vocabulary_round_trip():
    vocab = Vocabulary.build(CORPUS, level="char")
    assert vocab.decode(vocab.encode("a red circle", add_bos=True)) == "a red circle"


def test_unknown_tokens_become_unk_or_raise_when_strict():
    vocab = Vocabulary.build(CORPUS)
    assert vocab.encode("a purple circle", add_eos=False) == [
        vocab.encode(w, add_eos=False)[0] if w != "purple" else vocab.unk_id for w in ("a", "purple", "circle")
    ]
    with pytest.raises(AttnserveError, match="'purple' is not in the word-level vocabulary"):
        vocab.encode("a purple circle", strict=True)


def test_empty_text_and_bad_ids_are_errors():
    vocab = Vocabulary.build(CORPUS)
    with pytest.raises(AttnserveError, match="empty text"):
        vocab.encode("   ")
    with pytest.raises(AttnserveError, match="outside the vocabulary"):
        vocab.decode([4, 999])


def test_decode_stops_at_the_end_token():
    vocab = Vocabulary.build(CORPUS)
    ids = vocab.encode("a red circle") + vocab.encode("blue square")
    assert vocab.decode(ids) == "a red circle"


def test_max_size_and_min_count():
    vocab = Vocabulary.build(CORPUS, max_size=6)
    assert len(vocab) == 6 and vocab.tokens[4:] == ("a", "blue")
    assert "red" not in Vocabulary.build(CORPUS, min_count=2).tokens


def test_bad_files_and_tables(tmp_path):
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(AttnserveError, match="not an attnserve vocabulary file"):
        Vocabulary.load(tmp_path / "v.json")
    with pytest.raises(AttnserveError, match="starts with"):
        Vocabulary(("a", "b", "c", "d"))
    with pytest.raises(AttnserveError, match="twice"):
        Vocabulary(SPECIALS + ("a", "a"))
