"""The captions demo task: the sentences say what was drawn and where, the data and a short
training run are reproducible, training lowers the loss, the checkpoint loads as any
user's, and the metrics (BLEU-4, attention on the shapes) measure what they claim."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from attnserve.export.checkpoint import load_checkpoint
from attnserve.imaging import decode_image, preprocess
from attnserve.models import create_model, get_spec
from attnserve.runtime.generate import Generation
from attnserve.text import Vocabulary
from attnserve.train import captions
from attnserve.train.captions import (
    COLOURS,
    MODELS,
    OFFSET,
    RELATIONS,
    SHAPES,
    VOCABULARY,
    attention_in_box,
    attention_on_shapes,
    corpus_bleu,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PALETTE = np.array(list(COLOURS.values()), np.float64)


@pytest.fixture(scope="module")
def data():
    return captions.held_out(48, seed=3)


def test_the_configs_fit_the_data():
    for model, config in MODELS:
        spec = get_spec(model, config)
        assert spec.vocab_sizes == {captions.VOCABULARY_ROLE: len(VOCABULARY)}
        assert spec.preprocessing["image_size"] == captions.IMG_SIZE
        assert spec.preprocessing["resize"] == captions.RAW_SIZE  # a client resizes nothing, crops as training did
        assert spec.inputs[1].shape[1] + 1 == captions.CAPTION_TOKENS  # the whole graph's caption length


def test_each_sentence_says_what_was_drawn_and_where(data):
    assert data.images.shape == (48, captions.RAW_SIZE, captions.RAW_SIZE, 3) and data.images.dtype == np.uint8
    for i, sentence in enumerate(data.sentences):
        image = data.images[i, OFFSET:OFFSET + captions.IMG_SIZE, OFFSET:OFFSET + captions.IMG_SIZE].astype(float)
        coloured = image.max(-1) - image.min(-1) > 80  # the background is grey (noise included)
        words = sentence.split()
        relation = " ".join(words[3:-3])
        assert words[0] == words[-3] == "a" and relation in RELATIONS
        named = [(words[1], words[2]), (words[-2], words[-1])]
        boxes = data.boxes[i]
        inside = np.zeros_like(coloured)
        for (colour, shape), (x0, y0, x1, y1) in zip(named, boxes, strict=True):
            patch = coloured[y0:y1, x0:x1]
            pixels = image[y0:y1, x0:x1][patch]
            nearest = np.argmin(((pixels[:, None] - PALETTE[None]) ** 2).sum(-1), axis=1)
            assert np.mean(nearest == list(COLOURS).index(colour)) > 0.95, (i, sentence, colour)
            fill = patch.mean()  # square: the whole box; circle: about pi/4; triangle: about half
            want = {"square": (0.95, 1.0), "circle": (0.6, 0.85), "triangle": (0.4, 0.62)}[shape]
            assert want[0] <= fill <= want[1], (i, sentence, shape, fill)
            inside[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True  # antialiased edges
        assert not (coloured & ~inside).any(), f"{i}: colour outside the two shapes"
        first, second = boxes
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        dx, dy = centre[1] - centre[0]
        if relation == "left of":
            assert first[2] + captions.MIN_GAP <= second[0] and dx >= captions.DOMINANCE * abs(dy)
        else:
            assert first[3] + captions.MIN_GAP <= second[1] and dy >= captions.DOMINANCE * abs(dx)
    assert set(data.relations) == {0, 1} and len(set(data.shapes.ravel())) == len(SHAPES)


def test_the_data_is_seeded():
    a, b = captions.held_out(6, seed=1), captions.held_out(6, seed=1)
    assert np.array_equal(a.images, b.images) and a.sentences == b.sentences
    assert not np.array_equal(a.images, captions.held_out(6, seed=2).images)
    train, test = captions.splits(1, n_train=5, n_test=8)
    assert np.array_equal(test.images[:6], a.images)  # held_out is the evaluated split, any length
    assert not np.array_equal(train.images[:5], test.images[:5])


def test_sample_pngs_reach_a_model_as_the_evaluated_inputs(tmp_path):
    samples = captions.write_samples(tmp_path, n=3, seed=0)
    data = captions.held_out(3, seed=0)
    assert [s for _, s in samples] == list(data.sentences)
    spec = get_spec("vit_captioner", "shapes")
    sent = np.stack([preprocess(decode_image(path.read_bytes()), spec.preprocessing) for path, _ in samples])
    np.testing.assert_array_equal(sent, captions.model_inputs(data.images, "vit_captioner"))


def test_the_vocabulary_covers_every_sentence(data, tmp_path):
    tokens = captions.caption_tokens(data.sentences)
    assert (tokens[:, 0] == Vocabulary.bos_id).all() and (tokens != Vocabulary.unk_id).all()
    assert [VOCABULARY.decode(t[1:]) for t in tokens] == list(data.sentences)
    assert Vocabulary.load(VOCABULARY.save(tmp_path / "v.json")) == VOCABULARY


def test_corpus_bleu_by_hand():
    ref = "a red circle left of a blue square".split()
    assert corpus_bleu([ref], [ref]) == pytest.approx(1.0)
    # One word wrong at the end: 7/8, 6/7, 5/6 and 4/5 n-grams match; the product is 1/2.
    wrong = ref[:-1] + ["circle"]
    assert corpus_bleu([wrong], [ref]) == pytest.approx(0.5 ** 0.25)
    # One word short: every n-gram matches, the brevity penalty is exp(1 - 8/7).
    assert corpus_bleu([ref[:-1]], [ref]) == pytest.approx(np.exp(1 - 8 / 7))
    # Corpus-level: counts add up over sentences before the ratio.
    assert corpus_bleu([ref, wrong], [ref, ref]) == pytest.approx((15 / 16 * 13 / 14 * 11 / 12 * 9 / 10) ** 0.25)
    assert corpus_bleu([["square"] * 8], [ref]) == 0.0  # no bigram in common


def test_attention_in_box_counts_the_box_and_one_cell_around_it():
    grid = 8  # 8 px cells at 64 px
    box = (17, 20, 30, 31)  # columns 2-3, rows 2-3; dilated: columns 1-4, rows 1-4
    on = np.zeros((grid, grid))
    on[2, 3] = 1.0
    assert attention_in_box(on.ravel(), box) == 1.0
    edge = np.zeros((grid, grid))
    edge[4, 1] = 1.0  # the dilation's corner
    assert attention_in_box(edge.ravel(), box) == 1.0
    assert attention_in_box(edge.ravel(), box, dilate=0) == 0.0
    off = np.zeros((grid, grid))
    off[5, 3] = off[1, 5] = 0.5  # one cell past the dilation, below and to the right
    assert attention_in_box(off.ravel(), box) == 0.0
    uniform = np.full(grid * grid, 1 / grid**2)
    assert attention_in_box(uniform, box) == pytest.approx(16 / 64)
    with pytest.raises(ValueError, match="square grid"):
        attention_in_box(np.ones(10), box)


def test_each_shape_word_is_held_to_its_own_shape():
    data = captions.held_out(1, seed=0)
    (b0, b1) = data.boxes[0]
    grid = 8

    def on(box):
        m = np.full((grid, grid), 1e-9)
        m[(box[1] + box[3]) // 16, (box[0] + box[2]) // 16] = 1.0  # the box's centre cell
        return (m / m.sum()).ravel()

    ids = VOCABULARY.encode(data.sentences[0])  # a C S rel... a C S <eos>
    shape_at = [t for t, i in enumerate(ids) if VOCABULARY.tokens[i] in SHAPES]
    right = [on(b0) if t <= shape_at[0] else on(b1) for t in range(len(ids))]
    swapped = [on(b1) if t <= shape_at[0] else on(b0) for t in range(len(ids))]
    share, uniform = attention_on_shapes([Generation(ids, 0.0, right)], data)
    assert share == pytest.approx(1.0) and 0 < uniform < 1
    assert attention_on_shapes([Generation(ids, 0.0, swapped)], data)[0] < 0.5


@pytest.fixture(scope="module")
def short_data():
    return captions.splits(0, n_train=192, n_test=32)


@pytest.mark.parametrize(("model_name", "config"), MODELS)
def test_a_short_run_is_reproducible(short_data, model_name, config):
    first, _ = captions.train_one(model_name, config, short_data[0], seed=0, epochs=1, n=64)
    second, _ = captions.train_one(model_name, config, short_data[0], seed=0, epochs=1, n=64)
    a, b, init = first.state_dict(), second.state_dict(), captions.new_model(model_name, config, 0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert not all(torch.equal(a[k], init[k]) for k in a), "training changed nothing"


@pytest.mark.parametrize(("model_name", "config"), MODELS)
def test_a_short_run_lowers_the_held_out_loss(short_data, model_name, config):
    train_set, test_set = short_data
    x = torch.from_numpy(captions.model_inputs(test_set.images, model_name, config))
    tokens = torch.from_numpy(captions.caption_tokens(test_set.sentences))

    def held_out_loss(model):
        with torch.no_grad():
            return float(captions.teacher_forced_loss(model.eval(), (x, tokens)))

    before = held_out_loss(captions.new_model(model_name, config, 0))
    model, losses = captions.train_one(model_name, config, train_set, seed=0, epochs=4)
    after = held_out_loss(model)
    assert losses[-1] < losses[0] and after < 0.85 * before, (losses, before, after)  # 12 steps


def test_the_vit_captioner_starts_from_sine_cosine_positions():
    model = captions.new_model("vit_captioner", "shapes", 0)
    captions.init_positions(model)
    table = model.encoder.pos_embed[0].detach()  # (1 + 8 * 8, 64): the class token first
    assert not table[0].any()
    grid = table[1:].reshape(8, 8, 64)
    rows, cols = grid[..., :32], grid[..., 32:]  # the first half codes the row, the second the column
    assert torch.equal(rows[3, 0], rows[3, 7]) and not torch.equal(rows[3, 0], rows[4, 0])
    assert torch.equal(cols[0, 5], cols[7, 5]) and not torch.equal(cols[0, 5], cols[0, 6])
    with pytest.raises(ValueError, match="divisible by 4"):
        captions.sincos_positions(8, 30)


def test_train_writes_checkpoints_the_export_path_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(captions, "N_TRAIN", 32)
    monkeypatch.setattr(captions, "N_TEST", 8)
    monkeypatch.setattr(captions, "RECIPES", {k: dataclasses.replace(r, epochs=1) for k, r in captions.RECIPES.items()})
    lines = []
    results = captions.train(tmp_path, seed=0, on_progress=lines.append)
    assert [(r.model, r.config) for r in results] == list(MODELS)
    assert sum("epoch 1/1" in line for line in lines) == len(MODELS)
    vocab_path = tmp_path / results[0].extra["vocabulary"]
    assert Vocabulary.load(vocab_path) == VOCABULARY
    x = torch.from_numpy(captions.model_inputs(captions.held_out(2).images, "vit_captioner"))
    for r in results:
        meta = json.loads(r.metadata_path.read_text())
        assert meta["extra"]["vocabulary"] == vocab_path.name and meta["task"] == "captions"
        assert {"exact_match", "bleu4", "attention_on_shapes"} <= set(meta["metrics"])
        assert 0 <= meta["metrics"]["bleu4"] <= 1
        model = create_model(r.model, config=r.config)
        load_checkpoint(model, r.checkpoint)
        trained = create_model(r.model, r.config, str(r.checkpoint))
        tgt = torch.from_numpy(captions.caption_tokens(["a red circle left of a blue square"] * 2)[:, :-1])
        with torch.no_grad():
            torch.testing.assert_close(model(x, tgt), trained(x, tgt), rtol=0, atol=0)
