"""DETR: set prediction with a CNN and an encoder-decoder Transformer; the sine encoding,
where the positional encodings enter the attention, the object queries, the frozen
backbone BatchNorm, Hugging Face checkpoints, export at other image sizes, and the numpy
post-processing.

Parity with transformers' own DetrForObjectDetection (same random weights) is in
test_timm_parity.py, which runs the library in the reference environment.
"""

import math
import re

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import CheckpointError, InputError
from attnserve.models import create_model, get_spec
from attnserve.models.detr import CONFIGS, DETR, sine_position_encoding
from attnserve.postprocess_detr import Detections, box_cxcywh_to_xyxy, postprocess

QUERIES, CLASSES, DIM = 10, 10, 64  # tiny


def _run(model, images):
    with torch.inference_mode():
        return model(images)


def test_images_in_logits_and_boxes_out():
    spec = get_spec("detr")
    assert spec.task == "object-detection"
    assert spec.inputs[0].name == "images" and spec.inputs[0].shape == ("batch", 3, "height", "width")
    assert [(t.name, t.shape) for t in spec.outputs] == [
        ("logits", ("batch", QUERIES, CLASSES + 1)), ("boxes", ("batch", QUERIES, 4))]
    assert spec.labels is None and spec.preprocessing["crop"] is False
    model = create_model("detr")
    # The spec's size, and other ones (also not square, not a multiple of the stride).
    for batch, height, width in ((1, 64, 64), (3, 64, 64), (2, 96, 80), (1, 50, 130)):
        logits, boxes = _run(model, torch.randn(batch, 3, height, width))
        assert logits.shape == (batch, QUERIES, CLASSES + 1) and boxes.shape == (batch, QUERIES, 4)
        assert ((boxes > 0) & (boxes < 1)).all()  # sigmoid: normalised (cx, cy, w, h)


def _paper_encoding(height: int, width: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Appendix A.4 written out position by position: per axis, d/2 channels of sines
    and cosines of the coordinate normalised to (0, 2 pi]; rows first, then columns."""
    half = dim // 2
    out = np.zeros((height, width, dim))
    for r in range(height):
        for c in range(width):
            for axis, (p, n) in enumerate(((r + 1, height), (c + 1, width))):
                p = p / (n + 1e-6) * 2 * math.pi
                for i in range(half // 2):
                    freq = temperature ** (2 * i / half)
                    out[r, c, axis * half + 2 * i] = math.sin(p / freq)
                    out[r, c, axis * half + 2 * i + 1] = math.cos(p / freq)
    return out.reshape(height * width, dim)


def test_sine_encoding_is_the_papers_2d_encoding():
    pos = sine_position_encoding(3, 5, 16)
    assert pos.shape == (15, 16) and pos.dtype == torch.float32
    np.testing.assert_allclose(pos.numpy(), _paper_encoding(3, 5, 16), atol=2e-6)
    grid = pos.reshape(3, 5, 16)
    # The first half encodes the row only, the second the column only.
    assert torch.equal(grid[:, :1, :8].expand(3, 5, 8), grid[..., :8])
    assert torch.equal(grid[:1, :, 8:].expand(3, 5, 8), grid[..., 8:])
    assert len({tuple(v) for v in pos.round(decimals=4).tolist()}) == 15, "every position its own code"


def test_sine_encoding_is_normalised_to_the_map():
    """normalize=True: coordinates are fractions of the map, so the last row (column) has
    the same code at every size, and row r of h is row 2r of 2h."""
    small, large = sine_position_encoding(3, 4, 32).reshape(3, 4, 32), sine_position_encoding(6, 8, 32).reshape(6, 8, 32)
    torch.testing.assert_close(small[-1, -1], large[-1, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(small[:, :, :16], large[1::2, 1::2, :16], atol=1e-5, rtol=0)
    torch.testing.assert_close(small[:, :, 16:], large[1::2, 1::2, 16:], atol=1e-5, rtol=0)
    assert not torch.allclose(small[-2, -2], large[-2, -2], atol=1e-3)  # not a fixed table


def test_positions_enter_queries_and_keys_not_values():
    """Sec. 3.2: encodings are added at every attention layer's queries and keys. With
    the query and key projections zeroed, attention is uniform, so a layer's output
    no longer depends on the encodings, which it would if they reached the values."""
    model = create_model("detr")
    enc, dec = model.encoder.layers[0], model.decoder.layers[1]
    x, memory = torch.randn(2, 6, DIM), torch.randn(2, 6, DIM)
    pos_a, pos_b = torch.randn(1, 6, DIM), torch.randn(1, 6, DIM)
    queries = torch.randn(2, QUERIES, DIM)
    tgt = torch.randn(2, QUERIES, DIM)
    with torch.inference_mode():
        assert not torch.allclose(enc(x, pos_a), enc(x, pos_b), atol=1e-3)
        assert not torch.allclose(dec(tgt, memory, pos_a, queries), dec(tgt, memory, pos_b, queries), atol=1e-3)
        for attn in (enc.self_attn, dec.cross_attn):
            attn.q_proj.weight.zero_()
            attn.k_proj.weight.zero_()
        torch.testing.assert_close(enc(x, pos_a), enc(x, pos_b))
        torch.testing.assert_close(dec(tgt, memory, pos_a, queries), dec(tgt, memory, pos_b, queries))


def _outputs_changed_by_query(model, images, j: int) -> torch.Tensor:
    """Which queries' outputs change when the embedding of query j changes -> (N,).
    Beyond float round-off: a softmax-weighted sum of equal values is equal only up to it."""
    before = _run(model, images)
    with torch.no_grad():
        model.query_embed.weight[j] += torch.randn(DIM)
    after = _run(model, images)
    change = torch.stack([(a - b).abs().amax(dim=(0, 2)) for a, b in zip(before, after, strict=True)])
    return change.amax(dim=0) > 1e-4  # (N,)


def test_one_decoder_layer_keeps_each_query_apart():
    """The decoder starts from zeros (fig. 10), so its first self-attention mixes
    identical values: with one decoder layer a query's embedding reaches its own output
    only (through its cross-attention query)."""
    model = create_model("detr", dec_layers=1)
    changed = _outputs_changed_by_query(model, torch.randn(2, 3, 64, 64), j=3)
    assert changed.tolist() == [i == 3 for i in range(QUERIES)]


def test_later_decoder_layers_let_every_query_see_the_others():
    """Sec. 3.2: from the second layer on, self-attention among the outputs reasons about
    all objects together: one query's embedding changes every prediction."""
    changed = _outputs_changed_by_query(create_model("detr"), torch.randn(2, 3, 64, 64), j=3)
    assert changed.all()


def test_queries_are_a_set():
    """Sec. 3.2: the decoder is permutation-invariant in its queries; permuting the
    learned queries permutes the predictions the same way and changes nothing else."""
    model = create_model("detr")
    images = torch.randn(2, 3, 64, 64)
    logits, boxes = _run(model, images)
    order = torch.randperm(QUERIES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.query_embed.weight.copy_(model.query_embed.weight[order])
    logits2, boxes2 = _run(model, images)
    torch.testing.assert_close(logits2, logits[:, order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes2, boxes[:, order], atol=1e-5, rtol=1e-5)


def test_backbone_batchnorm_stays_frozen_in_training_mode():
    model = create_model("detr")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        frozen = model.backbone(images)
        stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
        model.train()
        assert model.training and not any(m.training for m in model.backbone.modules()
                                          if isinstance(m, torch.nn.BatchNorm2d))
        torch.testing.assert_close(model.backbone(images), frozen, atol=0, rtol=0)
        assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in stats.items())


def test_paper_configs_are_detr_r50_and_r101():
    with torch.device("meta"):  # shapes only
        models = {c: DETR(CONFIGS[c]) for c in ("resnet50", "resnet101")}
    r50 = models["resnet50"]
    assert r50.query_embed.weight.shape == (100, 256) and r50.class_embed.out_features == 92
    assert r50.input_proj.in_channels == 2048 and len(r50.encoder.layers) == len(r50.decoder.layers) == 6
    assert r50.encoder.layers[0].ffn.fc1.out_features == 2048 and r50.decoder.layers[0].cross_attn.num_heads == 8
    # Everything in transformers' DetrForObjectDetection state dicts (num_labels=91, frozen
    # BatchNorm's four tensors included): 41.6M and 60.7M, the paper's 41M and 60M (table 1).
    counts = {c: sum(v.numel() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked"))
              for c, m in models.items()}
    assert counts == {"resnet50": 41_631_008, "resnet101": 60_675_360}


# Our names -> Hugging Face's, written out independently of the filter's patterns.
def _hf_backbone_key(key: str) -> str:
    """timm ResNet names (ours) -> transformers' ResNet."""
    key = re.sub(r"^conv1\.", "embedder.embedder.convolution.", key)
    key = re.sub(r"^bn1\.", "embedder.embedder.normalization.", key)
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", key)
    if m:
        stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        rest = re.sub(r"^downsample\.0\.", "shortcut.convolution.", rest)
        rest = re.sub(r"^downsample\.1\.", "shortcut.normalization.", rest)
        rest = re.sub(r"^conv(\d)\.", lambda c: f"layer.{int(c.group(1)) - 1}.convolution.", rest)
        rest = re.sub(r"^bn(\d)\.", lambda c: f"layer.{int(c.group(1)) - 1}.normalization.", rest)
        key = f"encoder.stages.{stage}.layers.{block}.{rest}"
    return key


def _huggingface_state_dict(model: DETR, hub: bool, timm_backbone: bool) -> dict[str, torch.Tensor]:
    """Our weights in the layout of DetrForObjectDetection: the Hub's (transformers 4:
    conv_encoder, out_proj, fc1) or transformers 5's (o_proj, mlp.fc1); timm's or
    transformers' ResNet. Frozen BatchNorm has no step counter."""
    out_proj, fc = ("out_proj", "") if hub else ("o_proj", "mlp.")
    backbone = "model.backbone.conv_encoder.model." if hub else "model.backbone.model."
    layer_names = {"norm1": "self_attn_layer_norm", "self_attn": "self_attn", "cross_attn": "encoder_attn"}
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone."):
            name = key.removeprefix("backbone.")
            new = backbone + (name if timm_backbone else _hf_backbone_key(name))
        elif key.startswith(("encoder.", "decoder.layers.")):
            part, _, index, module, rest = key.split(".", 4)
            if module in ("self_attn", "cross_attn"):
                rest = rest.replace("out_proj", out_proj)
                module = layer_names[module]
            elif module == "ffn":
                module = fc.rstrip(".") or None
            elif module == "norm1":
                module = layer_names[module]
            elif module == "norm2":
                module = "final_layer_norm" if part == "encoder" else "encoder_attn_layer_norm"
            elif module == "norm3":
                module = "final_layer_norm"
            new = ".".join(p for p in ("model", part, "layers", index, module, rest) if p)
        elif key.startswith("decoder.norm."):
            new = "model.decoder.layernorm." + key.removeprefix("decoder.norm.")
        else:
            head, rest = key.split(".", 1)
            new = {"input_proj": "model.input_projection", "query_embed": "model.query_position_embeddings",
                   "class_embed": "class_labels_classifier", "bbox_embed": "bbox_predictor"}[head] + "." + rest
        sd[new] = value.clone().contiguous()
    return sd


LAYOUTS = {"hub-timm": (True, True), "hub-no-timm": (True, False),
           "transformers5-timm": (False, True), "transformers5-resnet": (False, False)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_huggingface_layouts_load_through_the_filter(layout, tmp_path):
    from safetensors.torch import save_file

    trained = create_model("detr", seed=7)
    sd = _huggingface_state_dict(trained, *LAYOUTS[layout])
    assert "model.query_position_embeddings.weight" in sd and "class_labels_classifier.weight" in sd
    assert "model.decoder.layernorm.weight" in sd and "model.decoder.layers.1.encoder_attn.q_proj.bias" in sd
    assert ("model.encoder.layers.0.fc1.weight" in sd) == LAYOUTS[layout][0]
    save_file(sd, str(tmp_path / "hf.safetensors"))
    loaded = create_model("detr", checkpoint=str(tmp_path / "hf.safetensors"))
    images = torch.randn(2, 3, 64, 96)
    for got, want in zip(_run(loaded, images), _run(trained, images), strict=True):
        assert torch.equal(got, want)


def test_other_huggingface_detr_models_are_refused(tmp_path):
    sd = _huggingface_state_dict(create_model("detr"), hub=True, timm_backbone=True)
    sd["bbox_attention.q_linear.weight"] = torch.zeros(DIM, DIM)  # DetrForSegmentation's mask head
    torch.save(sd, tmp_path / "segmentation.pt")
    with pytest.raises(CheckpointError, match="bbox_attention.*DetrForSegmentation"):
        create_model("detr", checkpoint=str(tmp_path / "segmentation.pt"))


def test_export_takes_other_image_sizes(exported_tiny):
    """The exported graph computes the sine encoding from the feature map's size."""
    result = exported_tiny("detr")
    spec = get_spec("detr")
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        for batch, height, width in ((2, 96, 80), (1, 130, 50)):
            feed = spec.example_inputs(batch, seed=5, height=height, width=width)
            expected, actual = ref.run(feed), ort.run(feed)
            assert expected["boxes"].shape == (batch, QUERIES, 4)
            report = compare_outputs(expected, actual, spec.tolerance("fp32"))
            assert report.passed, report.failures()


def _torch_postprocess(logits, boxes, sizes, threshold):
    """The reference implementation's PostProcess plus Hugging Face's threshold, in torch."""
    prob = torch.from_numpy(logits).softmax(-1)
    scores, labels = prob[..., :-1].max(-1)
    cx, cy, w, h = torch.from_numpy(boxes).unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    img_h, img_w = torch.tensor(sizes, dtype=torch.float32).unbind(1)
    xyxy = xyxy * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    keep = scores > threshold
    return [(xyxy[b][keep[b]], scores[b][keep[b]], labels[b][keep[b]]) for b in range(len(logits))]


def test_postprocess_matches_torch():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 100, 92)) * 4).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (3, 100, 4)).astype(np.float32)
    sizes = [(480, 640), (800, 600), (37, 1333)]
    results = postprocess(logits, boxes, sizes, threshold=0.3)
    want = _torch_postprocess(logits, boxes, sizes, 0.3)
    assert sum(len(r) for r in results) > 10 and any(len(r) < 100 for r in results)
    for got, (w_boxes, w_scores, w_labels) in zip(results, want, strict=True):
        assert got.boxes.dtype == np.float32 and got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.labels, w_labels.numpy())
        np.testing.assert_allclose(got.scores, w_scores.numpy(), rtol=1e-5)
        np.testing.assert_allclose(got.boxes, w_boxes.numpy(), rtol=1e-5, atol=1e-3)
    # One (height, width) for the whole batch is the same as repeating it.
    same = postprocess(logits, boxes, (480, 640), threshold=0.3)
    again = postprocess(logits, boxes, [(480, 640)] * 3, threshold=0.3)
    for a, b in zip(same, again, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)


def test_postprocess_leaves_out_no_object_and_scales_boxes():
    logits = np.full((1, 3, 4), -10.0, np.float32)
    logits[0, 0, 2] = 10.0  # class 2, sure
    logits[0, 1, 3] = 10.0  # "no object", sure: its best real class is far below any threshold
    logits[0, 2, [0, 3]] = 10.0  # class 0 and "no object" share the mass: score 0.5
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 1, 1], [0.25, 0.75, 0.5, 0.5]]], np.float32)
    (det,) = postprocess(logits, boxes, [(100, 200)], threshold=0.4)
    assert det.labels.tolist() == [2, 0]
    np.testing.assert_allclose(det.scores, [1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(det.boxes, [[80, 30, 120, 70], [0, 50, 100, 100]], atol=1e-4)
    (strict,) = postprocess(logits, boxes, [(100, 200)], threshold=0.5)
    assert strict.labels.tolist() == [2], "strictly above the threshold"


def test_postprocess_with_nothing_above_the_threshold_gives_empty_arrays():
    logits = np.zeros((2, 5, 4), np.float32)  # every score 1/4
    (a, b) = postprocess(logits, np.full((2, 5, 4), 0.5, np.float32), [(10, 10), (20, 30)], threshold=0.9)
    for det in (a, b):
        assert isinstance(det, Detections) and len(det) == 0
        assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.labels.shape == (0,)
        assert det.boxes.dtype == np.float32 and det.labels.dtype == np.int64


@pytest.mark.parametrize(("logits", "boxes", "sizes", "match"), [
    (np.zeros((5, 4)), np.zeros((5, 4)), [(1, 1)], r"logits of shape \(batch, queries"),
    (np.zeros((1, 5, 1)), np.zeros((1, 5, 4)), [(1, 1)], "at least one real class"),
    (np.zeros((1, 5, 4)), np.zeros((1, 4, 4)), [(1, 1)], r"boxes of shape \(1, 5, 4\)"),
    (np.zeros((2, 5, 4)), np.zeros((2, 5, 4)), [(1, 1)] * 3, r"one positive \(height, width\) per image"),
    (np.zeros((1, 5, 4)), np.zeros((1, 5, 4)), [(0, 10)], "positive"),
])
def test_postprocess_says_what_is_wrong(logits, boxes, sizes, match):
    with pytest.raises(InputError, match=match):
        postprocess(logits, boxes, sizes)


def test_box_conversion():
    np.testing.assert_allclose(box_cxcywh_to_xyxy(np.array([0.5, 0.4, 0.2, 0.6])), [0.4, 0.1, 0.6, 0.7])
