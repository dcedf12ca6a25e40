"""The Image Transformer (Parmar et al. 2018): local 1-D and 2-D attention see exactly the
memory blocks of sec. 3.3 in the paper's generation orders (checked against masks built
here from the paper's words), no logit depends on a later value, the step-wise decoder
with its fixed-size cache reproduces the teacher-forced graph, and seeded generation on
the exported parts draws the eager parts' images value for value."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from attnserve import runtime
from attnserve.errors import AttnserveError, InputError
from attnserve.models import create_model, get_spec
from attnserve.models.image_transformer import CONFIGS, ImageTransformerConfig, cache_length
from attnserve.postprocess_image_transformer import (
    START_TOKEN,
    bits_per_dim,
    generation_order,
    load_image_sampler,
    sample_images,
    tokens_to_images,
)
from attnserve.runtime.generate import greedy_search

NAME = "image_transformer"
TINY = ["tiny", "tiny_2d"]  # local 1-D (class-conditional) and local 2-D (unconditional)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation runs hundreds of steps of tiny matrices; on two shared cores a second
    torch thread only waits for the first (a 32 x 32 linear layer: 7 ms per step with one
    thread, 120 ms with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paper_generation_steps(cfg: ImageTransformerConfig) -> np.ndarray:
    """The generation step of every raster index of the (h, w * 3) map (sec. 3.3): raster
    order for 1-D; for 2-D the query blocks in raster order, raster order inside each."""
    W3 = cfg.img_width * 3
    steps = np.zeros(cfg.img_height * W3, dtype=np.int64)
    for p in range(len(steps)):
        r, c = divmod(p, W3)
        if cfg.attention == "local_1d":
            steps[p] = p
        else:
            hq, wq = cfg.query_shape
            block = (r // hq) * (W3 // wq) + c // wq
            steps[p] = block * hq * wq + (r % hq) * wq + c % wq
    return steps


def paper_visibility(cfg: ImageTransformerConfig) -> np.ndarray:
    """(N, N) bool over raster indices: query p may attend key m. Sec. 3.3: 1-D, the
    memory is p's query block of l_q and the l_m positions before it; 2-D, the memory
    extends p's h_q x w_q query block h_m rows up and w_m columns left and right; in
    both, positions not generated yet (later in the generation order) are masked."""
    W3 = cfg.img_width * 3
    n = cfg.img_height * W3
    steps = paper_generation_steps(cfg)
    visible = np.zeros((n, n), dtype=bool)
    for p in range(n):
        r, c = divmod(p, W3)
        for m in range(n):
            mr, mc = divmod(m, W3)
            if cfg.attention == "local_1d":
                start = p // cfg.block_length * cfg.block_length
                in_memory = start - cfg.memory_length <= m < start + cfg.block_length
            else:
                (hq, wq), (hm, wm) = cfg.query_shape, cfg.memory_flange
                top, left = r // hq * hq, c // wq * wq
                in_memory = top - hm <= mr < top + hq and left - wm <= mc < left + wq + wm
            visible[p, m] = in_memory and steps[m] <= steps[p]
    return visible


# A third geometry beside the tiny ones: a non-square image, a 1-D memory that is not a
# multiple of the block, and 2-D blocks whose memory reaches two block rows up.
ODD = {
    "odd_1d": ImageTransformerConfig(img_height=4, img_width=6, block_length=12, memory_length=7, dim=16,
                                     num_heads=2, ffn_dim=16, depth=1),
    "odd_2d": ImageTransformerConfig(img_height=6, img_width=4, attention="local_2d", query_shape=(2, 4),
                                     memory_flange=(4, 3), dim=16, num_heads=2, ffn_dim=16, depth=1),
}
GEOMETRIES = {**{c: CONFIGS[c] for c in TINY}, **ODD}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_attention_sees_exactly_the_papers_memory_blocks(geometry):
    cfg = GEOMETRIES[geometry]
    model = create_model(NAME, cfg)
    visible = torch.from_numpy(paper_visibility(cfg))
    attn = model.layers[0].attn
    n, h, d = visible.shape[0], cfg.num_heads, cfg.dim // cfg.num_heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, d, generator=g) for _ in range(3))
    # Dense attention with the mask built above, against the model's (the custom op).
    logits = (q * d**-0.5) @ k.transpose(-2, -1)
    want = logits.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attn.attend(q, k, v), want, atol=1e-5, rtol=1e-5)

    # The decoder step's mask over its cache is the same row of the same mask.
    steps = paper_generation_steps(cfg)
    raster_of = np.argsort(steps)
    S = model.cache_len
    for t in range(n):
        bias = model._memory_bias(torch.tensor([t]), torch.tensor([raster_of[t]]))[0, 0, 0]
        slot_steps = t - (S - 1) + np.arange(S)
        seen = {int(raster_of[s]) for s, b in zip(slot_steps, bias.tolist(), strict=True) if b == 0}
        assert seen == set(np.flatnonzero(visible[raster_of[t]]).tolist()), f"step {t}"


def test_2d_order_is_not_raster_order():
    """What the op's own causal flag would get wrong, and the model does not: in a 2-D
    query block's row band, the right neighbour's upper rows come later and the left
    neighbour's lower rows earlier than the query."""
    cfg = CONFIGS["tiny_2d"]
    visible = paper_visibility(cfg)
    W3 = cfg.img_width * 3
    query = 1 * W3 + 6  # row 1, first column of the second block in the first band
    assert visible[query, 1 * W3 + 5], "the left block's lower row is already generated"
    assert not visible[query, 0 * W3 + 12], "the right block's top row is not generated yet"
    np.testing.assert_array_equal(generation_order(8, 8, "local_2d", (2, 6)), np.argsort(paper_generation_steps(cfg)))


@pytest.mark.parametrize("config", TINY)
def test_a_value_changes_no_logit_before_it(config):
    cfg = CONFIGS[config]
    model = create_model(NAME, config)
    spec = get_spec(NAME, config)
    feed = {k: torch.from_numpy(v) for k, v in spec.example_inputs(1, seed=3).items()}
    steps = torch.from_numpy(paper_generation_steps(cfg))
    raster_of = torch.argsort(steps)
    with torch.inference_mode():
        base = model(**feed).reshape(-1, 256)
        for t in (0, 37, 100, len(steps) - 2):
            changed = {**feed, "pixels": feed["pixels"].clone()}
            flat = changed["pixels"].view(-1)
            flat[raster_of[t]] = (flat[raster_of[t]] + 128) % 256
            out = model(**changed).reshape(-1, 256)
            earlier = steps <= t
            torch.testing.assert_close(out[earlier], base[earlier], atol=0, rtol=0)
            # The next value reads this one directly: the test can fail.
            assert (out[raster_of[t + 1]] - base[raster_of[t + 1]]).abs().max() > 1e-3


@pytest.mark.parametrize("config", TINY)
def test_the_step_continues_the_teacher_forced_graph(config):
    model = create_model(NAME, config)
    spec = get_spec(NAME, config)
    feed = {k: torch.from_numpy(v) for k, v in spec.example_inputs(2, seed=1).items()}
    class_id = feed.get("class_id", torch.zeros(2, dtype=torch.int64))
    with torch.inference_mode():
        whole = model(**feed).reshape(2, -1, 256)
        emb, position, keys, values = model.encode(class_id)
        tokens, flat = torch.full((2,), START_TOKEN), feed["pixels"].reshape(2, -1)
        order = torch.from_numpy(generation_order(8, 8, model.cfg.attention, model.cfg.query_shape))
        for t in range(model.num_values):
            logits, index, position, keys, values = model.step(tokens, emb, position, keys, values)
            assert (index == order[t]).all() and (position == t + 1).all()
            torch.testing.assert_close(logits, whole[torch.arange(2), index], atol=1e-5, rtol=1e-5)
            tokens = flat[torch.arange(2), index]


def test_the_cache_holds_the_longest_look_back_of_the_paper_configs():
    """S, from an independent search over the paper's memory blocks: every key a query may
    see lies within its last S generation steps, and S - 1 would lose one."""
    for name, want in (("cifar10_1d", 512), ("cifar10_2d", None)):
        cfg = CONFIGS[name]
        W3, n = cfg.img_width * 3, cfg.img_height * cfg.img_width * 3
        steps = paper_generation_steps(cfg)
        r, c = np.divmod(np.arange(n), W3)
        if cfg.attention == "local_1d":
            start = np.arange(n) // cfg.block_length * cfg.block_length
            lo = np.maximum(start - cfg.memory_length, 0)  # the earliest key, in raster = generation order
            look_back = np.arange(n) - lo + 1
        else:
            (hq, wq), (hm, wm) = cfg.query_shape, cfg.memory_flange
            top, left = r // hq * hq, c // wq * wq
            in_memory = ((r[None] >= (top - hm)[:, None]) & (r[None] < (top + hq)[:, None])
                         & (c[None] >= (left - wm)[:, None]) & (c[None] < (left + wq + wm)[:, None]))
            earliest = np.where(in_memory, steps[None], n).min(axis=1)
            look_back = steps - earliest + 1
        got = cache_length(cfg, generation_order(cfg.img_height, cfg.img_width, cfg.attention, cfg.query_shape))
        assert got == look_back.max() and (want is None or got == want)


def test_paper_configs():
    """Sec. 5.1: 12 layers, d = 512, feed-forward 2048, 4 heads on CIFAR-10 and 8 on
    ImageNet; 32 x 32 x 3 = 3072 positions (sec. 3.3)."""
    for name in ("cifar10_1d", "cifar10_1d_cond", "cifar10_2d", "imagenet32_1d"):
        cfg = CONFIGS[name]
        assert (cfg.depth, cfg.dim, cfg.ffn_dim, cfg.img_height, cfg.img_width) == (12, 512, 2048, 32, 32)
        assert cfg.num_heads == (8 if name.startswith("imagenet") else 4)
        assert cfg.num_classes == (10 if name.endswith("cond") else 0)
        spec = get_spec(NAME, name)
        assert spec.outputs[0].shape == ("batch", 32, 32, 3, 256)
        assert spec.input_names == (["pixels", "class_id"] if cfg.num_classes else ["pixels"])


def test_bits_per_dim_is_the_cross_entropy_in_bits():
    model = create_model(NAME)
    feed = get_spec(NAME).example_inputs(2, seed=4)
    with torch.inference_mode():
        logits = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    want = F.cross_entropy(logits.reshape(-1, 256), torch.from_numpy(feed["pixels"]).reshape(-1),
                           reduction="none").reshape(2, -1).mean(1) / np.log(2)
    np.testing.assert_allclose(bits_per_dim(logits.numpy(), feed["pixels"]), want.numpy(), rtol=1e-5)
    uniform = np.zeros(feed["pixels"].shape + (256,), np.float32)
    np.testing.assert_allclose(bits_per_dim(uniform, feed["pixels"]), 8.0)  # log2(256)


# -- exported ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=TINY)
def exported(request, exported_tiny):
    return request.param, exported_tiny(NAME, request.param)


def test_exports_use_the_window_attention_op_as_the_paper_needs(exported):
    config, result = exported
    assert result.passed and set(result.parts) == {"encoder", "decoder_step"}
    graph = onnx.load(str(result.onnx_path), load_external_data=False).graph
    nodes = [n for n in graph.node if n.domain == "attnserve"]
    assert [n.op_type for n in nodes] == ["WindowAttention"] * CONFIGS[config].depth
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    if config == "tiny":  # 1-D: the op's raster causality is the paper's order
        assert attrs["causal"] == 1 and list(attrs["window"]) == [16] and list(attrs["memory_before"]) == [32]
        assert len(nodes[0].input) == 3
    else:  # 2-D: block-raster order through the additive mask, not the op's causal flag
        assert attrs["causal"] == 0 and list(attrs["window"]) == [2, 6]
        assert list(attrs["memory_before"]) == [3, 6] and list(attrs["memory_after"]) == [0, 6]
        assert len(nodes[0].input) == 5 and nodes[0].input[4]
    step = onnx.load(str(result.parts["decoder_step"]), load_external_data=False).graph
    assert not [n for n in step.node if n.domain == "attnserve"], "one query: plain attention over the cache"


def _class_ids(config):
    return np.array([3, 7], np.int64) if CONFIGS[config].num_classes else np.zeros(2, np.int64)


def test_seeded_generation_on_the_exported_parts_is_the_eager_generation(exported):
    config, result = exported
    eager = load_image_sampler(result.out_dir, "torch", threads=1)
    ort = load_image_sampler(result.out_dir, "ort", threads=1)
    assert eager[2:] == ort[2:] and ort[3] == (8, 8)
    class_id = _class_ids(config)
    for kwargs in (dict(seed=[5, 6], temperature=1.0), dict(seed=0, temperature=0.0)):
        want = sample_images(*eager, class_id, **kwargs)
        got = sample_images(*ort, class_id, **kwargs)
        np.testing.assert_array_equal(got, want)
        assert got.shape == (2, 8, 8, 3) and got.dtype == np.uint8
    # A sampler that made one value everywhere would prove nothing.
    sampled = sample_images(*ort, class_id, seed=[5, 6])
    assert len(np.unique(sampled[0])) > 50 and not np.array_equal(sampled[0], sampled[1])
    # The project's greedy search drives the same parts to the same image.
    encoder, step, config_, (h, w) = ort
    greedy = greedy_search(encoder, step, {"class_id": class_id}, config_)
    order = generation_order(h, w, CONFIGS[config].attention, CONFIGS[config].query_shape)
    tokens = np.array([g.tokens for g in greedy])
    np.testing.assert_array_equal(tokens_to_images(tokens, h, w, order), sample_images(*ort, class_id, temperature=0))


def test_a_seed_names_an_image_whatever_the_batch(exported):
    config, result = exported
    parts = load_image_sampler(result.out_dir, "ort", threads=1)
    class_id = _class_ids(config)
    together = sample_images(*parts, class_id, seed=[11, 12])
    alone = sample_images(*parts, class_id[1:], seed=12)
    np.testing.assert_array_equal(together[1], alone[0])
    np.testing.assert_array_equal(sample_images(*parts, class_id, seed=[11, 12]), together)
    assert not np.array_equal(sample_images(*parts, class_id, seed=[13, 12])[0], together[0])


def test_exported_step_continues_the_exported_whole_graph(exported):
    config, result = exported
    spec = get_spec(NAME, config)
    feed = spec.example_inputs(2, seed=8)
    with runtime.load(result.out_dir, "ort", threads=1) as whole:
        expected = whole.run(feed)["logits"].reshape(2, -1, 256)
    encoder, step, gen, _ = load_image_sampler(result.out_dir, "ort", threads=1)
    state = encoder.run({"class_id": feed.get("class_id", np.zeros(2, np.int64))})
    tokens, flat = np.full(2, START_TOKEN), feed["pixels"].reshape(2, -1)
    for _ in range(gen.max_length):
        out = step.run({"tokens": tokens, **{n: state[n] for n in gen.static + gen.state}})
        np.testing.assert_allclose(out["logits"], expected[np.arange(2), out["pixel_index"]], atol=1e-4)
        tokens = flat[np.arange(2), out["pixel_index"]]
        state = {**state, **{n: out[f"next_{n}"] for n in gen.state}}


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(img_height=7), "168 channel values, which do not split into query blocks of 16"),
    (dict(attention="local_2d", query_shape=(3, 6)), "does not split into query blocks of 3 x 6"),
    (dict(attention="local_2d", query_shape=(2, 5)), "8 x 24 map of channel values"),
    (dict(attention="local_3d"), "attention must be one of"),
    (dict(dim=30, num_heads=3), "multiple of 4"),
    (dict(positions="rotary"), "positions must be one of"),
])
def test_configs_that_do_not_split_are_refused(overrides, message):
    with pytest.raises(InputError, match=message):
        create_model(NAME, **overrides)
    with pytest.raises(InputError, match=message):
        get_spec(NAME, **overrides)


def test_bad_inputs_are_one_sentence():
    model = create_model(NAME)  # class-conditional, 10 classes
    pixels = torch.zeros(1, 8, 8, 3, dtype=torch.int64)
    cls = torch.tensor([1])
    for value in (256, -1):
        bad = pixels.clone()
        bad[0, 2, 5, 1] = value
        with pytest.raises(InputError, match=rf"intensities 0..255, got \[{value}\]"):
            model(bad, cls)
    with pytest.raises(InputError, match=r"shape \(batch, 8, 8, 3\), got \(1, 3, 8, 8\)"):
        model(pixels.permute(0, 3, 1, 2), cls)
    with pytest.raises(InputError, match="must be integer intensities"):
        model(pixels.float(), cls)
    with pytest.raises(InputError, match=r"class_id values must be in \[0, 10\), got \[10\]"):
        model(pixels, torch.tensor([10]))
    with pytest.raises(InputError, match="class-conditional .* pass class_id"):
        model(pixels)
    unconditional = create_model(NAME, "tiny_2d")
    with pytest.raises(InputError, match="unconditional model has the one class 0"):
        unconditional.encode(torch.tensor([0, 1]))
    emb, position, keys, values = model.encode(cls)
    with pytest.raises(InputError, match="the start, at position 0"):
        model.step(torch.tensor([START_TOKEN]), emb, position + 1, keys, values)
    with pytest.raises(InputError, match=r"generation step 0..191, got \[192\]"):
        model.step(torch.tensor([4]), emb, position + 192, keys, values)


def test_bad_sampler_arguments_are_refused(exported_tiny):
    parts = load_image_sampler(exported_tiny(NAME).out_dir, "ort", threads=1)
    one = np.array([1], np.int64)
    with pytest.raises(InputError, match="temperature must be a finite number >= 0"):
        sample_images(*parts, one, temperature=-1.0)
    with pytest.raises(InputError, match="2 seeds for a batch of 1"):
        sample_images(*parts, one, seed=[1, 2])
    with pytest.raises(InputError, match="class_id must be a non-empty"):
        sample_images(*parts, np.zeros((1, 1), np.int64))
    with pytest.raises(AttnserveError, match="not the 3072 of a 32 x 32"):
        sample_images(*parts[:3], (32, 32), one)
    with pytest.raises(InputError, match="intensities 0..255"):
        tokens_to_images(np.full((1, 192), 256), 8, 8, np.arange(192))
    with pytest.raises(AttnserveError, match="not an Image Transformer export"):
        load_image_sampler(exported_tiny(NAME).out_dir / "encoder")  # a part alone has no manifest
