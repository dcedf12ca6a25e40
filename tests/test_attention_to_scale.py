"""Attention to Scale: one shared network per scale, attention weights that sum to one
over the scales at every pixel, and a merged score map that is their weighted sum
(eq. 2-3); DeepLab-LargeFOV's sizes; numpy post-processing to label maps.

The tiny config's export with parity is test_export.py's; here both outputs are checked.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnserve import runtime
from attnserve.errors import InputError
from attnserve.models import create_model, get_spec
from attnserve.models.attention_to_scale import CONFIGS, AttentionToScale, score_size
from attnserve.postprocess_segmentation import resize_bilinear, resize_nearest, segmentation_map

NAME = "attention_to_scale"


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(get_spec(NAME).example_inputs(batch, seed=seed)["images"])


def test_spec_images_in_scores_and_attention_out():
    spec = get_spec(NAME)
    assert spec.task == "semantic-segmentation"
    assert spec.inputs[0].name == "images" and spec.inputs[0].shape == ("batch", 3, 65, 65)
    assert [(t.name, t.shape) for t in spec.outputs] == [
        ("scores", ("batch", 5, 9, 9)), ("attention", ("batch", 3, 9, 9))]
    assert spec.preprocessing["output_stride"] == 8 and spec.preprocessing["scales"] == [1.0, 0.75, 0.5]
    # 255 x - the Caffe mean pixel, as DeepLab's VGG-16 takes its input (RGB here).
    pixel = (np.array([0.5, 0.5, 0.5]) - spec.preprocessing["mean"]) / spec.preprocessing["std"]
    np.testing.assert_allclose(pixel, 127.5 - np.array([122.675, 116.669, 104.008]), rtol=1e-6)


def test_weights_sum_to_one_over_scales_and_merge_the_score_maps():
    """Eq. 3: w^s = exp(h^s) / sum_t exp(h^t) per pixel; eq. 2: g = sum_s w^s f^s."""
    model = create_model(NAME)
    images = _images()
    with torch.inference_mode():
        merged, weights = model(images)
        features, scores = model.scale_outputs(images)
        h = model.attention(torch.cat(features, dim=1))
    assert weights.shape == (2, 3, 9, 9) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 9, 9))
    torch.testing.assert_close(weights, torch.exp(h) / torch.exp(h).sum(dim=1, keepdim=True))
    want = sum(weights[:, s:s + 1] * scores[s] for s in range(3))
    torch.testing.assert_close(merged, want)
    # The weights differ from pixel to pixel and from scale to scale: not a fixed average.
    assert weights.std(dim=(2, 3)).min() > 1e-3 and not torch.allclose(weights[:, 0], weights[:, 1])


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_attention_selects_a_scale(scale):
    """Attention saturated on one scale gives that scale's (resized) score map: the weights
    multiply each scale's scores pixel by pixel, shared by all classes."""
    model = create_model(NAME)
    with torch.no_grad():
        model.attention.conv2.bias.zero_()
        model.attention.conv2.bias[scale] = 60.0
    images = _images()
    with torch.inference_mode():
        merged, weights = model(images)
        _, scores = model.scale_outputs(images)
    torch.testing.assert_close(weights[:, scale], torch.ones(2, 9, 9))
    torch.testing.assert_close(merged, scores[scale], rtol=1e-5, atol=1e-5)
    others = [s for s in range(3) if s != scale]
    assert all(not torch.allclose(merged, scores[s], rtol=1e-3, atol=1e-3) for s in others)


def test_one_shared_network_sees_each_scale_at_its_size():
    """The image at 1, 0.75, 0.5 goes through the same weights (the share-net); Caffe's
    Interp sizes (n - 1) s + 1: 65, 49, 33 pixels, score maps 9, 7, 5, resized to 9."""
    model = create_model(NAME)
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-1], out[1].shape[-1])))
    with torch.inference_mode():
        model(_images(1))
    assert seen == [(65, 9), (49, 7), (33, 5)]
    # The shared network's weights are counted once: backbone + attention model.
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "attention"}


def test_the_attention_model_sees_every_scale():
    """The attention at a pixel depends on the features of all scales: changing only the
    half-scale input's contribution (through its fc7) changes the weights."""
    model = create_model(NAME)
    images = _images(1)
    with torch.inference_mode():
        features, _ = model.scale_outputs(images)
        base = model.attention(torch.cat(features, dim=1))
        features[2] = features[2] + 1.0
        moved = model.attention(torch.cat(features, dim=1))
    assert model.attention.conv1.in_channels == 3 * 64 and model.attention.conv1.kernel_size == (3, 3)
    assert model.attention.conv2.out_channels == 3 and model.attention.conv2.kernel_size == (1, 1)
    assert not torch.allclose(base, moved)


def test_voc_is_deeplab_largefov_with_the_papers_attention_model():
    with torch.device("meta"):
        model = AttentionToScale(CONFIGS["voc"])
        merged, weights = model(torch.empty(1, 3, 321, 321, device="meta"))
    # DeepLab-LargeFOV: 20.5M parameters (Chen et al., ICLR 2015, table 2), 321 -> 41.
    assert round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 1) == 20.5
    assert merged.shape == (1, 21, 41, 41) and weights.shape == (1, 3, 41, 41)
    assert model.backbone.fc6.dilation == (12, 12) and model.backbone.fc6.out_channels == 1024
    assert model.backbone.conv5_1.dilation == (2, 2) and model.backbone.conv4_1.dilation == (1, 1)
    # Sec. 4: 512 filters of 3 x 3, then S = 3 of 1 x 1.
    assert model.attention.conv1.out_channels == 512 and model.attention.conv2.out_channels == 3
    assert get_spec(NAME, "voc").outputs[0].shape == ("batch", 21, 41, 41)


@pytest.mark.parametrize(("size", "grid"), [(321, 41), (65, 9), (64, 9), (50, 8)])
def test_pooling_rounds_up_as_caffe_does(size, grid):
    assert score_size(size) == grid
    model = create_model(NAME, img_size=size)
    assert get_spec(NAME, img_size=size).outputs[0].shape[2:] == (grid, grid)
    with torch.inference_mode():
        merged, weights = model(torch.randn(1, 3, size, size))
    assert merged.shape[-2:] == weights.shape[-2:] == (grid, grid)


def test_bad_inputs_and_scales_are_refused():
    model = create_model(NAME)
    with pytest.raises(InputError, match=r"images of shape \(batch, 3, height, width\), got \(2, 1, 65, 65\)"):
        model(torch.randn(2, 1, 65, 65))
    with pytest.raises(ValueError, match="scales must be distinct and positive"):
        create_model(NAME, scales=(1.0, 1.0))


def test_exported_model_gives_both_outputs_with_parity(exported_tiny):
    result = exported_tiny(NAME)
    assert result.passed
    for report in result.parity:
        assert [o.name for o in report.outputs] == ["scores", "attention"]
        assert all(o.max_abs_error < 1e-4 and o.cosine_similarity > 0.99999 for o in report.outputs)
    feed = get_spec(NAME).example_inputs(2, seed=4)
    with runtime.load(result.out_dir, "ort") as ort:
        out = ort.run(feed)
    np.testing.assert_allclose(out["attention"].sum(axis=1), 1.0, rtol=1e-5)
    labels = segmentation_map(out["scores"], (65, 65))
    with torch.inference_mode():
        scores, _ = create_model(NAME)(torch.from_numpy(feed["images"]))
    eager = F.interpolate(scores, size=(65, 65), mode="bilinear", align_corners=True).argmax(1).numpy()
    assert labels.shape == (2, 65, 65) and (labels == eager).mean() > 0.999


# -- numpy post-processing ---------------------------------------------------------------

@pytest.mark.parametrize(("grid", "size"), [((9, 9), (65, 65)), ((9, 7), (40, 100)), ((5, 6), (3, 4)),
                                            ((1, 4), (5, 9)), ((4, 4), (1, 1))])
def test_bilinear_resize_is_torch_align_corners(grid, size):
    maps = np.random.default_rng(0).standard_normal((2, 3, *grid)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(maps), size=size, mode="bilinear", align_corners=True).numpy()
    got = resize_bilinear(maps, size)
    assert got.dtype == np.float32 and got.shape == (2, 3, *size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bilinear_segmentation_is_the_argmax_of_resized_scores():
    scores = np.random.default_rng(1).standard_normal((2, 5, 9, 9)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(scores), size=(65, 65), mode="bilinear", align_corners=True)
    labels = segmentation_map(scores, (65, 65))
    assert labels.dtype == np.int64 and labels.shape == (2, 65, 65)
    assert (labels == want.argmax(1).numpy()).mean() > 0.999  # float ties aside
    # Grid points sit on pixels 8k: there the label is the grid's own argmax.
    np.testing.assert_array_equal(labels[:, ::8, ::8], scores.argmax(1))
    # One image, no batch axis.
    np.testing.assert_array_equal(segmentation_map(scores[0], (65, 65)), labels[0])
    # No size: the grid's labels.
    np.testing.assert_array_equal(segmentation_map(scores), scores.argmax(1))


def test_nearest_segmentation_copies_the_nearest_cell():
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    grid_labels = scores.argmax(1)[0]
    labels = segmentation_map(scores, (23, 31), method="nearest")[0]
    assert labels.shape == (23, 31)
    for i in range(23):
        for j in range(31):
            src_i, src_j = i * 4 / 22, j * 5 / 30  # aligned corners
            near = [(r, c) for r in range(5) for c in range(6) if abs(r - src_i) <= 0.5 and abs(c - src_j) <= 0.5]
            assert labels[i, j] in {grid_labels[r, c] for r, c in near}
    assert labels[0, 0] == grid_labels[0, 0] and labels[-1, -1] == grid_labels[-1, -1]
    np.testing.assert_array_equal(resize_nearest(grid_labels, (5, 6)), grid_labels)
    # An integer label map stays integer.
    assert resize_nearest(grid_labels, (10, 12)).dtype == grid_labels.dtype


def test_postprocessing_refuses_bad_input():
    scores = np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(InputError, match="expected scores of shape"):
        segmentation_map(np.zeros((4, 4)), (8, 8))
    with pytest.raises(InputError, match="unknown method 'bicubic'; choose one of: bilinear, nearest"):
        segmentation_map(scores, (8, 8), method="bicubic")
    with pytest.raises(InputError, match="size must be positive, got 0 x 8"):
        segmentation_map(scores, (0, 8))
    with pytest.raises(InputError, match=r"size must be \(height, width\)"):
        segmentation_map(scores, 8)


def test_postprocessing_imports_no_torch():
    code = ("import sys, attnserve.postprocess_segmentation; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
