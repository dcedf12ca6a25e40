"""The Transformer and the ViT captioner: sizes from the papers, the key/value cache
against the teacher-forced model, an empty cache on ONNX Runtime, and the limits a
caller can hit."""

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.errors import AttnserveError, InputError
from attnserve.models import create_model, get_entry
from attnserve.models.layers.transformer import sinusoidal_positions
from attnserve.runtime.generate import greedy_search


def test_base_sizes_are_the_papers():
    with torch.device("meta"):
        base = get_entry("transformer").model_cls(get_entry("transformer").configs["base"])
        captioner = get_entry("vit_captioner").model_cls(get_entry("vit_captioner").configs["base"])
    # Table 3: the base model has 65M parameters (shared 37k BPE embedding).
    assert 60e6 < sum(p.numel() for p in base.parameters()) < 66e6
    assert (len(base.encoder), len(base.decoder.layers), base.decoder.dim, base.decoder.num_heads) == (6, 6, 512, 8)
    assert captioner.num_patches == 14 * 14 and captioner.cfg.encoder.embed_dim == 768


def test_sinusoidal_positions_follow_the_formula():
    pe = sinusoidal_positions(torch.arange(50), 16)
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(np.sin(pos / 10000 ** (2 * i / 16)), abs=1e-5)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(np.cos(pos / 10000 ** (2 * i / 16)), abs=1e-5)


@pytest.mark.parametrize("name", ["transformer", "vit_captioner"])
def test_stepping_with_the_cache_equals_teacher_forcing(name):
    model = create_model(name, "tiny")
    spec = get_entry(name).spec("tiny")
    feed = {k: torch.from_numpy(v) for k, v in spec.example_inputs(3, seed=1).items()}
    with torch.inference_mode():
        whole = model(**feed)
        tgt = feed.pop("tgt")
        *static, keys, values = model.encode(*feed.values())
        steps = []
        for t in range(tgt.shape[1]):
            logits, keys, values, attention = model.step(tgt[:, t], *static, keys, values)
            steps.append(logits)
            assert keys.shape[3] == t + 1 and torch.allclose(attention.sum(-1), torch.ones(3))
    assert torch.allclose(torch.stack(steps, 1), whole, atol=1e-5)


def test_padding_gets_no_attention_anywhere():
    """The source's padding changes nothing: same logits with other junk in the pad slots."""
    model = create_model("transformer", "tiny")
    src = torch.randint(4, 40, (2, 7))
    lengths = torch.tensor([7, 4])
    tgt = torch.randint(4, 40, (2, 5))
    other = src.clone()
    other[1, 4:] = torch.randint(4, 40, (3,))
    with torch.inference_mode():
        assert torch.allclose(model(src, lengths, tgt)[1], model(other, lengths, tgt)[1], atol=1e-6)


def test_the_exported_step_runs_from_an_empty_cache(exported_tiny):
    result = exported_tiny("transformer")
    enc_t, step_t, _ = runtime.load_generator(result.out_dir, "torch")
    enc_o, step_o, _ = runtime.load_generator(result.out_dir, "ort")
    feed = {"src": np.array([[5, 6, 7, 0]], dtype=np.int64), "src_lengths": np.array([3], dtype=np.int64)}
    state = enc_o.run(feed)
    assert state["self_keys"].shape == (1, 2, 4, 0, 8)
    step_feed = {"tokens": np.array([1], dtype=np.int64), **state}
    want, got = step_t.run(step_feed), step_o.run(step_feed)
    assert got["next_self_keys"].shape == (1, 2, 4, 1, 8)
    assert np.allclose(got["logits"], want["logits"], atol=1e-4)
    with pytest.raises(InputError, match="empty axis 'src_len'"):  # empty text
        enc_o.run({"src": np.zeros((1, 0), dtype=np.int64), "src_lengths": np.array([0], dtype=np.int64)})


def test_captioner_limits_are_clear_errors(exported_tiny):
    result = exported_tiny("vit_captioner")
    enc, step, config = runtime.load_generator(result.out_dir, "ort")
    image = np.zeros((1, 3, 32, 32), dtype=np.float32)
    with pytest.raises(AttnserveError, match="more than this model's 12 positions"):
        greedy_search(enc, step, {"images": image}, config, max_length=13)
    with pytest.raises(InputError, match=r"images has shape \(1, 3, 48, 48\), expected \(batch, 3, 32, 32\)"):
        enc.run({"images": np.zeros((1, 3, 48, 48), dtype=np.float32)})
    with pytest.raises(InputError, match=r"images has shape \(1, 1, 32, 32\)"):
        enc.run({"images": np.zeros((1, 1, 32, 32), dtype=np.float32)})


def test_text_in_text_out_with_the_vocabularies_saved_beside_the_model(exported_tiny):
    result = exported_tiny("transformer")
    vocabs = runtime.load_vocabularies(result.out_dir)
    assert set(vocabs) == {"source", "target"} and len(vocabs["target"]) == 40
    ids = vocabs["source"].encode("w5 w9 w12 qqq")  # qqq is out of the vocabulary: <unk>
    assert ids[3] == vocabs["source"].unk_id
    enc, step, config = runtime.load_generator(result.out_dir, "ort")
    translations = []
    for text in ("w5 w9 w12 qqq", "w30 w31", "w7 w7 w8 w20 w21 w4", "w39"):
        ids = vocabs["source"].encode(text)
        tokens = greedy_search(enc, step, {"src": np.array([ids]), "src_lengths": np.array([len(ids)])},
                               config)[0].tokens
        words = [vocabs["target"].tokens[t] for t in tokens if t >= 4]
        translations.append(vocabs["target"].decode(tokens))
        assert translations[-1] == " ".join(words)
    assert any(translations), "the untrained model says nothing for every input"


def test_a_vocabulary_that_does_not_fit_is_refused_before_export(tmp_path):
    from attnserve.errors import ExportError
    from attnserve.export import export_onnx
    from attnserve.text import SPECIALS, Vocabulary

    small = Vocabulary(SPECIALS + ("a", "b"))
    with pytest.raises(ExportError, match="the target vocabulary has 6 tokens but transformer"):
        export_onnx("transformer", tmp_path / "out", vocabularies={"target": small})
    with pytest.raises(ExportError, match="vit has no 'source' vocabulary"):
        export_onnx("vit", tmp_path / "out", vocabularies={"source": small})
    assert not (tmp_path / "out").exists()
