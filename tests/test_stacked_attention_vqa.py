"""stacked_attention_vqa: eq. 1-23 against a region-by-region reference for both question
models, attention maps that are distributions, padding that changes nothing (eager and
ONNX), any question length in the exported graph, clear errors for bad ids and lengths,
and the torch-free question encoding and answer post-processing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import CheckpointError, InputError
from attnserve.export import export_onnx, save_state_dict
from attnserve.imaging import top_k
from attnserve.models import create_model, get_spec
from attnserve.models.stacked_attention_vqa import CONFIGS, VGG19, vgg_features
from attnserve.postprocess_vqa import check_questions, encode_questions, top_answers
from attnserve.text import Vocabulary
from conftest import placeholder_vocabulary

NAME = "stacked_attention_vqa"
ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"


def _live(model):
    """Sharper attention than the random init's near-uniform one: scaled W_P, so that the
    maps and the answer depend visibly on where the question looks."""
    with torch.no_grad():
        for layer in model.attention:
            layer.score.weight.mul_(8.0)
    return model


def _feed(config: str, batch: int = 3, words: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    spec = get_spec(NAME, config)
    return {k: torch.from_numpy(v) for k, v in spec.example_inputs(batch, seed=seed, words=words).items()}


def _question_reference(model, ids: torch.Tensor) -> torch.Tensor:
    """v_Q of one unpadded question (W,): torch's own nn.LSTM, last state (eq. 3-10); or
    eq. 12-14 window by window, the question padded to c words with zero embeddings."""
    x = model.embed(ids)  # (W, E)
    if model.cfg.question_model == "lstm":
        _, (h, _) = model.lstm(x.unsqueeze(0))
        return h[0, 0]
    pooled = []
    for c, conv in enumerate(model.convs, start=1):
        padded = torch.cat([x, x.new_zeros(max(c - len(ids), 0), x.shape[1])])
        windows = [torch.tanh((conv.weight * padded[t:t + c].T).sum(dim=(1, 2)) + conv.bias)  # eq. 12
                   for t in range(len(padded) - c + 1)]
        pooled.append(torch.stack(windows).amax(dim=0))  # eq. 13
    return torch.cat(pooled)  # eq. 14


def _reference(model, images, question, lengths):
    """Eq. 1-22 one question at a time, attention as explicit sums over the regions."""
    logits, maps = [], []
    for b in range(images.shape[0]):
        f = model.features(images[b:b + 1])[0].flatten(1).T  # (m, 512), row-major regions (eq. 1)
        v_i = torch.tanh(model.image_proj(f))  # eq. 2
        u = _question_reference(model, question[b, : lengths[b]])  # v_Q = u^0
        layer_maps = []
        for layer in model.attention:
            h_a = torch.tanh(layer.image(v_i) + layer.query(u))  # eq. 15 / 19: (+) adds u's row to each region
            scores = layer.score(h_a)[:, 0]
            p = torch.exp(scores) / torch.exp(scores).sum()  # eq. 16 / 20
            attended = sum(p[i] * v_i[i] for i in range(len(p)))  # eq. 17 / 21
            u = attended + u  # eq. 18 / 22
            layer_maps.append(p)
        logits.append(model.classifier(u))  # eq. 23 before its softmax
        maps.append(torch.stack(layer_maps))
    return torch.stack(logits), torch.stack(maps)


@pytest.mark.parametrize("config", ["tiny", "tiny_cnn"])
def test_equations_1_to_23(config):
    model = _live(create_model(NAME, config)).double()
    feed = _feed(config)
    feed["images"] = feed["images"].double()
    feed["question_lengths"] = torch.tensor([1, 4, 7])  # shorter than the trigram too
    with torch.inference_mode():
        logits, attention = model(**feed)
        want_logits, want_maps = _reference(model, feed["images"], feed["question"], feed["question_lengths"])
    G = model.cfg.grid_size
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(attention, want_maps.unflatten(-1, (G, G)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("config", ["tiny", "tiny_cnn"])
def test_both_attention_maps_are_distributions_over_the_regions(config):
    model = _live(create_model(NAME, config))
    with torch.inference_mode():
        _, attention = model(**_feed(config))
    assert attention.shape == (3, 2, 4, 4)  # (batch, layers, grid, grid)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=(-1, -2)), torch.ones(3, 2), rtol=0, atol=1e-6)
    assert (attention[:, 0] - attention[:, 1]).abs().max() > 1e-3, "the second layer looks elsewhere"
    assert attention.amax() > 1.5 / 16, "not uniform: some region gets half as much again as its share"


def _padded(feed, extra: int, seed: int):
    """The same questions with `extra` more columns and every position past each length
    holding a random word (not <pad>): padding of any content."""
    rng = np.random.default_rng(seed)
    q, lengths = feed["question"].numpy(), feed["question_lengths"].numpy()
    B, W = q.shape
    out = rng.integers(4, 60, size=(B, W + extra)).astype(np.int64)
    for b in range(B):
        out[b, : lengths[b]] = q[b, : lengths[b]]
    return {**feed, "question": torch.from_numpy(out)}


@pytest.mark.parametrize("config", ["tiny", "tiny_cnn"])
def test_padding_does_not_change_the_answer(config):
    model = _live(create_model(NAME, config))
    feed = _feed(config)
    feed["question_lengths"] = torch.tensor([2, 5, 7])
    padded = _padded(feed, extra=6, seed=1)
    assert (padded["question"][:, :7] != feed["question"]).any(), "the padding really changed"
    with torch.inference_mode():
        logits, attention = model(**feed)
        logits_p, attention_p = model(**padded)
        # A real word does change it: the check can fail.
        changed = {**feed, "question": feed["question"].clone()}
        changed["question"][0, 1] = 4 if changed["question"][0, 1] != 4 else 5
        logits_c, _ = model(**changed)
    torch.testing.assert_close(logits_p, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(attention_p, attention, rtol=0, atol=1e-7)
    assert (logits_c[0] - logits[0]).abs().max() > 1e-4
    torch.testing.assert_close(logits_c[1:], logits[1:], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def exports(exported_tiny, tmp_path_factory):
    """tiny (LSTM) as the generic suite exports it; tiny_cnn with live attention."""
    out = tmp_path_factory.mktemp("san")
    checkpoint = save_state_dict(_live(create_model(NAME, "tiny_cnn")), out / "live.pt")
    cnn = export_onnx(NAME, out / "tiny_cnn", config="tiny_cnn", checkpoint=checkpoint,
                      vocabularies={"source": placeholder_vocabulary(60)})
    assert cnn.passed
    return {"tiny": exported_tiny(NAME), "tiny_cnn": cnn}


@pytest.mark.parametrize("config", ["tiny", "tiny_cnn"])
@pytest.mark.parametrize("words", [2, 19])
def test_questions_of_any_length_match_eager(exports, config, words):
    """Exported with questions of 7 words; 2 and 19 (longer than any example) match."""
    spec = get_spec(NAME, config)
    feed = spec.example_inputs(3, seed=words, words=words)
    feed["question_lengths"] = np.minimum(feed["question_lengths"], words)
    feed["question_lengths"][-1] = words
    out_dir = exports[config].out_dir
    with runtime.load(out_dir, "ort") as ort, runtime.load(out_dir, "torch") as eager:
        want, got = eager.run(feed), ort.run(feed)
    report = compare_outputs(want, got, spec.tolerance("fp32"))
    assert report.passed, report.failures()
    # Measured: logits within 4e-7 and attention within 2e-8 of eager (fp32, both question models).
    assert report.outputs[0].max_abs_error < 1e-5


@pytest.mark.parametrize("config", ["tiny", "tiny_cnn"])
def test_padding_does_not_change_the_exported_answer(exports, config):
    feed = {k: v.numpy() for k, v in _feed(config).items()}
    feed["question_lengths"] = np.array([3, 1, 6])
    padded = {k: v.numpy() for k, v in _padded({k: torch.from_numpy(v) for k, v in feed.items()}, 9, 2).items()}
    with runtime.load(exports[config].out_dir, "ort") as ort:
        alone, batched = ort.run(feed), ort.run(padded)
    np.testing.assert_allclose(batched["logits"], alone["logits"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batched["attention"], alone["attention"], rtol=0, atol=1e-7)


def test_bad_questions_raise_one_clear_error():
    model = create_model(NAME)
    feed = _feed("tiny", batch=2)
    with pytest.raises(InputError, match=r"question ids must be in \[0, 60\).*got \[60, 99\]"):
        model(**{**feed, "question": torch.tensor([[5, 60, 7, 8, 9, 10, 11], [99, 5, 5, 5, 5, 5, 5]])})
    with pytest.raises(InputError, match=r"question_lengths must be in \[1, 7\].*got \[0\]"):
        model(**{**feed, "question_lengths": torch.tensor([0, 3])})
    with pytest.raises(InputError, match=r"question_lengths must be in \[1, 7\].*got \[8\]"):
        model(**{**feed, "question_lengths": torch.tensor([8, 3])})
    with pytest.raises(InputError, match=r"images of shape \(batch, 3, 128, 128\)"):
        model(**{**feed, "images": torch.zeros(2, 3, 96, 96)})
    with pytest.raises(InputError, match="must be int64"):
        model(**{**feed, "question": feed["question"].int()})


def test_spec_and_paper_configs():
    spec = get_spec(NAME)
    assert spec.task == "visual-question-answering"
    assert spec.input_names == ["images", "question", "question_lengths"]
    assert spec.inputs[1].shape == ("batch", "words") and spec.inputs[1].value_range == (4, 60)
    assert spec.output_names == ["logits", "attention"] and spec.outputs[1].shape == ("batch", 2, 4, 4)
    assert spec.vocab_sizes == {"source": 60}
    vqa = CONFIGS["vqa"]
    # Sec. 3.1: 448 x 448 through VGG to pool5, 14 x 14 regions of 512; SAN(2); the 1000
    # most frequent answers; released-code sizes d = 1024 (LSTM), 1280 (CNN), k = 512.
    assert (vqa.grid_size, vqa.region_dim, vqa.num_attention_layers, vqa.num_answers) == (14, 512, 2, 1000)
    assert vqa.question_dim == 1024 and CONFIGS["vqa_cnn"].question_dim == 1280 and vqa.attention_dim == 512
    big = get_spec(NAME, "vqa")
    assert big.inputs[0].shape == ("batch", 3, 448, 448) and big.outputs[1].shape == ("batch", 2, 14, 14)
    assert big.preprocessing["image_size"] == 448 and big.preprocessing["resize"] == 448


def test_trunk_has_torchvisions_vgg19_layout():
    names = {k: tuple(v.shape) for k, v in vgg_features(VGG19).state_dict().items()}
    assert len(names) == 32 and names["0.weight"] == (64, 3, 3, 3)  # 16 convolutions, weight and bias
    assert names["34.weight"] == (512, 512, 3, 3)  # conv5_4, the last before pool5 (index 36)
    model = create_model(NAME)
    with pytest.raises(CheckpointError, match="not a torchvision VGG state dict"):
        model.load_trunk({"classifier.0.weight": torch.zeros(1)})
    full = {f"features.{k}": v for k, v in vgg_features(VGG19).state_dict().items()}
    with pytest.raises(CheckpointError, match="the VGG weights do not fit this trunk"):
        model.load_trunk(full)  # VGG-19 into the tiny trunk


_VGG_REFERENCE = """
import sys, numpy as np, torch
from torchvision.models.vgg import make_layers, cfgs
from safetensors.torch import save_file
torch.manual_seed(0)
tiny = make_layers([8, "M", 16, "M", 16, "M", 32, "M", 32, "M"]).eval()
images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    features = tiny(images)
state = {"features." + k: v.contiguous() for k, v in tiny.state_dict().items()}
state["classifier.0.weight"] = torch.zeros(3, 3)  # dropped by load_trunk
save_file(state, sys.argv[1] + "/vgg.safetensors")
e = {k: list(v.shape) for k, v in make_layers(cfgs["E"]).state_dict().items()}
np.savez(sys.argv[1] + "/vgg.npz", images=images.numpy(), features=features.numpy(), e=repr(e))
"""


@pytest.mark.reference
@pytest.mark.skipif(not REF_PYTHON.exists(), reason="no .venv-ref: run `make reference-env`")
def test_torchvision_vgg_loads_into_the_trunk(tmp_path):
    import ast

    from safetensors.torch import load_file

    subprocess.run([str(REF_PYTHON), "-c", _VGG_REFERENCE, str(tmp_path)], check=True, capture_output=True,
                   text=True)
    model = create_model(NAME)
    model.load_trunk(load_file(str(tmp_path / "vgg.safetensors")))
    data = np.load(tmp_path / "vgg.npz")
    with torch.inference_mode():
        got = model.features(torch.from_numpy(data["images"])).numpy()
    np.testing.assert_allclose(got, data["features"], rtol=1e-5, atol=1e-6)
    assert np.abs(data["features"]).max() > 1e-3
    # VGG-19 (configuration E) itself: the same names and shapes as torchvision's.
    theirs = ast.literal_eval(str(data["e"]))
    assert {k: tuple(v) for k, v in theirs.items()} == {
        k: tuple(v.shape) for k, v in vgg_features(VGG19).state_dict().items()}


# -- torch-free question encoding and answers ---------------------------------------------

VOCAB = Vocabulary(("<pad>", "<bos>", "<eos>", "<unk>", "what", "is", "the", "man", "holding", "color", "?"))


def test_encode_questions_pads_and_counts():
    feed = encode_questions(["What is the man holding?", "What color?"], VOCAB)
    np.testing.assert_array_equal(feed["question"], [[4, 5, 6, 7, 8, 10], [4, 9, 10, 0, 0, 0]])
    np.testing.assert_array_equal(feed["question_lengths"], [6, 3])
    assert feed["question"].dtype == np.int64 and feed["question_lengths"].dtype == np.int64
    assert encode_questions(["what is the dog?"], VOCAB)["question"][0, 3] == Vocabulary.unk_id
    with pytest.raises(InputError, match="'dog' is not in the word-level vocabulary"):
        encode_questions(["what is the dog?"], VOCAB, strict=True)


def test_questions_longer_than_the_maximum_are_refused_not_truncated():
    with pytest.raises(InputError, match="question 1 has 6 words, more than the maximum of 4.*not truncated"):
        encode_questions(["what color?", "what is the man holding?"], VOCAB, max_len=4)
    assert encode_questions(["what is the man holding?"], VOCAB, max_len=6)["question_lengths"][0] == 6
    with pytest.raises(InputError, match="non-empty list"):
        encode_questions("what?", VOCAB)


def test_check_questions_names_every_problem():
    check_questions(np.array([[4, 5, 0]]), np.array([2]), 11)
    with pytest.raises(InputError, match=r"ids must be in \[0, 11\).*got \[11, 12\]; question_lengths"):
        check_questions(np.array([[4, 11, 12]]), np.array([4]), 11)


def test_top_answers_are_the_softmax_top_k():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 10)).astype(np.float32)
    answers = [f"answer{i}" for i in range(10)]
    top = top_answers(logits, k=3, answers=answers)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for row, p in zip(top, probs, strict=True):
        ids = np.argsort(-p)[:3]
        assert [a.answer_id for a in row] == ids.tolist()
        assert [a.text for a in row] == [answers[i] for i in ids]
        np.testing.assert_allclose([a.score for a in row], p[ids], rtol=1e-6)
    assert top_answers(logits, k=20)[0][0].text == str(top_k(logits, 1)[1][0, 0])  # k capped, ids as text
    with pytest.raises(InputError, match="9 answers given for a model of 10"):
        top_answers(logits, answers=answers[:9])


def test_text_to_answers_through_the_exported_model(exports):
    """Questions as text -> ids with the export's own vocabulary -> ONNX Runtime -> answers."""
    out_dir = exports["tiny"].out_dir
    vocab = Vocabulary.load(out_dir / "vocab-source.json")
    assert len(vocab) == 60
    feed = encode_questions(["w4 w5 w6", "w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18"], vocab)
    check_questions(feed["question"], feed["question_lengths"], len(vocab))
    feed["images"] = get_spec(NAME).example_inputs(2)["images"]
    with runtime.load(out_dir, "ort") as ort, runtime.load(out_dir, "torch") as eager:
        got, want = ort.run(feed), eager.run(feed)
    assert [a.answer_id for a in top_answers(got["logits"])[1]] == [
        a.answer_id for a in top_answers(want["logits"])[1]]
    assert feed["question"].shape[1] == 12 > get_spec(NAME).default_dims["words"]


def test_postprocess_vqa_imports_no_torch():
    code = "import sys, attnserve.postprocess_vqa; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
