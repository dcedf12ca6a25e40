"""The Triton kernels of `attnserve.ops.kernels` against the NumPy references.

Runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before the
kernel modules are imported: `triton.jit` picks the interpreter when a kernel is
defined). With TRITON_INTERPRET=0 and a GPU the same tests run on the GPU. Shapes are
tiny because the interpreter is slow. fp32 is held to ~1e-5; fp16 to ~1e-2 against the
reference computed in float64 on the fp16-rounded inputs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from attnserve.errors import AttnserveError  # noqa: E402
from attnserve.ops import reference  # noqa: E402
from attnserve.ops.kernels import grid_sample_triton as gs  # noqa: E402
from attnserve.ops.kernels import window_attention_triton as wa  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 runs the kernels on a GPU and there is none", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def _rand(*shape, seed: int, dtype=torch.float32, low=None, high=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if low is None:
        t = torch.randn(shape, generator=g)
    else:
        t = torch.rand(shape, generator=g) * (high - low) + low
    return t.to(dtype).to(DEVICE)


def _np(t):
    """float64 copy, so the reference computes on exactly the (possibly fp16-rounded) values."""
    return None if t is None else t.detach().double().cpu().numpy()


def _check(out: torch.Tensor, want: np.ndarray, like: torch.Tensor) -> None:
    assert out.dtype == like.dtype
    assert tuple(out.shape) == want.shape
    np.testing.assert_allclose(out.double().cpu().numpy(), want, **TOL[like.dtype])


# --- window attention -----------------------------------------------------------------

def _check_attention(shape, *, dtype=torch.float32, bias_shape=None, mask_shape=None, seed=0,
                     **kw) -> None:
    q, k, v = (_rand(*shape, seed=seed + i, dtype=dtype) for i in range(3))
    bias = None if bias_shape is None else _rand(*bias_shape, seed=seed + 3, dtype=dtype)
    mask = None if mask_shape is None else _rand(*mask_shape, seed=seed + 4, dtype=dtype)
    out = wa.window_attention(q, k, v, rel_pos_bias=bias, mask=mask, **kw)
    want = reference.window_attention(_np(q), _np(k), _np(v), rel_pos_bias=_np(bias), mask=_np(mask), **kw)
    _check(out, want, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shift", [None, [3]])
@pytest.mark.parametrize("window", [4, 8])
def test_block_1d(window, shift, dtype):
    # S = 16 windows 4 and 8; shift 3 is not a multiple of either window
    _check_attention((2, 2, 16, 4), window=[window], shift=shift, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shift", [None, [2, 1]])
@pytest.mark.parametrize("window", [(4, 3), (2, 6)])
def test_block_2d_bias_mask(window, shift, dtype):
    nq = window[0] * window[1]
    n_windows = (8 // window[0]) * (6 // window[1])
    _check_attention((2, 2, 8, 6, 5), window=list(window), shift=shift, dtype=dtype,
                     bias_shape=(2, nq, nq), mask_shape=(n_windows, nq, nq), seed=10)


def test_block_2d_swin_mask_with_minus_inf():
    # Excluded keys as -inf in the mask, the first keys of every window among them: the
    # online softmax must not produce inf - inf while no key has been admitted yet.
    window, nq = [2, 2], 4
    mask = torch.zeros(6, nq, nq)
    mask[:, :, 0] = float("-inf")
    mask[:, 0, 0] = 0.0  # query 0 attends to key 0 only ...
    mask[:, 0, 1:] = float("-inf")
    mask[:, 3, :3] = float("-inf")  # ... and query 3 to key 3 only
    q, k, v = (_rand(1, 2, 4, 6, 3, seed=20 + i) for i in range(3))
    out = wa.window_attention(q, k, v, window=window, shift=[1, 1], mask=mask.to(DEVICE))
    want = reference.window_attention(_np(q), _np(k), _np(v), window=window, shift=[1, 1], mask=_np(mask))
    assert np.isfinite(want).all()
    _check(out, want, q)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("memory", [(2, 0), (1, 3), (0, 0)])
def test_block_1d_memory_causal(memory, causal):
    before, after = memory
    nk = 4 + before + after
    _check_attention((1, 2, 12, 4), window=[4], memory_before=[before], memory_after=[after], causal=causal,
                     bias_shape=(2, 4, nk), mask_shape=(3, 4, nk), seed=30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_block_2d_memory_causal(causal, dtype):
    # Image Transformer's local 2-D attention: query blocks with memory around them
    window, before, after = [2, 3], [1, 2], [2, 1]
    nk = (2 + 1 + 2) * (3 + 2 + 1)
    _check_attention((2, 1, 4, 6, 4), window=window, memory_before=before, memory_after=after,
                     causal=causal, bias_shape=(1, 6, nk), dtype=dtype, seed=40)


def test_block_shift_causal_follows_reference():
    # Causality is in rolled coordinates, as in the reference.
    _check_attention((1, 2, 4, 6, 4), window=[2, 3], shift=[1, 2], causal=True, seed=45)


def test_block_many_query_tiles_and_scale():
    # S = 80 > the 64 queries of one program: two query tiles, the second one partial
    _check_attention((1, 2, 80, 6), window=[8], shift=[5], scale=0.7, bias_shape=(2, 8, 8), seed=50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", ["none", "per_head", "per_query"])
@pytest.mark.parametrize("window,dilation", [(3, 1), (5, 2), (4, 3)])
def test_sliding_1d(window, dilation, bias, dtype):
    # odd map size 11; window 4 is not centred: (w - 1) // 2 keys before, w // 2 after
    B, H, S = 2, 2, 11
    bias_shape = {"none": None, "per_head": (H, window), "per_query": (B, H, S, window)}[bias]
    _check_attention((B, H, S, 3), mode="sliding", window=[window], dilation=[dilation],
                     bias_shape=bias_shape, dtype=dtype, seed=60)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window,dilation,bias", [
    ((3, 3), (1, 1), "per_head"), ((3, 5), (2, 1), "per_query"), ((2, 3), (1, 2), "none"),
])
def test_sliding_2d(window, dilation, bias, causal):
    B, H, S = 2, 2, (5, 7)
    K = window[0] * window[1]
    bias_shape = {"none": None, "per_head": (H, K), "per_query": (B, H, *S, K)}[bias]
    _check_attention((B, H, *S, 4), mode="sliding", window=list(window), dilation=list(dilation),
                     causal=causal, bias_shape=bias_shape, seed=70)


def test_sliding_2d_fp16():
    _check_attention((1, 2, 5, 7, 8), mode="sliding", window=[3, 3], dilation=[1, 2],
                     bias_shape=(1, 2, 5, 7, 9), dtype=torch.float16, seed=80)


def test_window_attention_non_contiguous_inputs():
    # (B, S, h, d) transposed to (B, h, S, d): the launcher must not assume contiguity
    q, k, v = (_rand(2, 8, 2, 4, seed=90 + i).transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = wa.window_attention(q, k, v, window=[4], shift=[1])
    _check(out, reference.window_attention(_np(q), _np(k), _np(v), window=[4], shift=[1]), q)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=[3]), "not a multiple of the window"),
    (dict(window=[4], mode="dense"), "mode must be one of"),
    (dict(window=[4], mode="sliding", shift=[1]), "block' only"),
    (dict(window=[4], dilation=[2]), "dilation applies"),
    (dict(window=[4], rel_pos_bias=torch.zeros(2, 4, 5)), "rel_pos_bias must be"),
    (dict(window=[4], mask=torch.zeros(3, 4, 4)), "mask must be"),
    (dict(window=[4, 4]), "2 values for 1 spatial axes"),
])
def test_window_attention_bad_arguments(kwargs, match):
    q = torch.zeros(1, 2, 8, 4, device=DEVICE)
    kwargs = {a: b.to(DEVICE) if torch.is_tensor(b) else b for a, b in kwargs.items()}
    with pytest.raises(AttnserveError, match=match):
        wa.window_attention(q, q, q, **kwargs)


def test_window_attention_bad_tensors():
    q = torch.zeros(1, 2, 8, 4, device=DEVICE)
    with pytest.raises(AttnserveError, match="one shape"):
        wa.window_attention(q, q[:, :1], q, window=[4])
    with pytest.raises(AttnserveError, match="1 or 2 spatial axes"):
        wa.window_attention(q[0], q[0], q[0], window=[4])
    with pytest.raises(AttnserveError, match="float32 or float16"):
        wa.window_attention(q.double(), q.double(), q.double(), window=[4])


# --- grid sampling ----------------------------------------------------------------------

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]


def _check_sample(x, grid, **kw):
    out = gs.grid_sample(x, grid, **kw)
    _check(out, reference.grid_sample(_np(x), _np(grid), **kw), x)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_grid_sample_4d(mode, padding_mode, align_corners):
    # coordinates beyond [-1, 1] exercise the padding, several reflections deep
    x = _rand(2, 3, 5, 7, seed=100)
    grid = _rand(2, 4, 6, 2, seed=101, low=-2.5, high=2.5)
    _check_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_grid_sample_5d(mode, padding_mode, align_corners):
    x = _rand(2, 2, 3, 4, 5, seed=110)
    grid = _rand(2, 2, 3, 3, 3, seed=111, low=-2.0, high=2.0)
    _check_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@pytest.mark.parametrize("shape,grid_shape", [
    ((1, 2, 6, 5), (1, 3, 4, 2)), ((1, 2, 3, 4, 5), (1, 2, 3, 4, 3)),
])
@pytest.mark.parametrize("mode", MODES)
def test_grid_sample_fp16(shape, grid_shape, mode):
    x = _rand(*shape, seed=120, dtype=torch.float16)
    grid = _rand(*grid_shape, seed=121, dtype=torch.float16, low=-1.3, high=1.3)
    _check_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


@pytest.mark.parametrize("align_corners,width,coords,want_columns", [
    # align_corners=False, W=4: pixel = 2c + 1.5 -> ties at 0.5, 1.5, 2.5
    (False, 4, [-0.5, 0.0, 0.5, -0.25], [0, 2, 2, 1]),
    # align_corners=True, W=5: pixel = 2c + 2 -> ties at 0.5, 1.5, 2.5, 3.5
    (True, 5, [-0.75, -0.25, 0.25, 0.75], [0, 2, 2, 4]),
])
def test_grid_sample_nearest_rounds_half_to_even(align_corners, width, coords, want_columns):
    x = torch.arange(width, dtype=torch.float32).reshape(1, 1, 1, width).to(DEVICE)
    grid = torch.tensor([[[[c, 0.0] for c in coords]]], dtype=torch.float32, device=DEVICE)  # (1, 1, 4, 2)
    out = gs.grid_sample(x, grid, mode="nearest", align_corners=align_corners)
    assert out.flatten().tolist() == [float(c) for c in want_columns]
    _check_sample(x, grid, mode="nearest", align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_grid_sample_size_one_axes(padding_mode, align_corners):
    # H = 1: align_corners maps every y to row 0 and reflection has a zero-width span
    x = _rand(1, 2, 1, 4, seed=130)
    grid = _rand(1, 3, 5, 2, seed=131, low=-1.5, high=1.5)
    for mode in MODES:
        _check_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def test_grid_sample_many_channels_and_positions():
    # C = 20 > 16 channels per chunk and 12 * 13 = 156 > 128 positions per program
    x = _rand(2, 20, 6, 5, seed=140)
    grid = _rand(2, 12, 13, 2, seed=141, low=-1.2, high=1.2)
    _check_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def test_grid_sample_non_contiguous_and_fp16_grid_with_fp32_input():
    x = _rand(2, 5, 4, 3, seed=150).transpose(2, 3)  # (2, 5, 3, 4), not contiguous
    grid = _rand(2, 3, 2, 2, seed=151, low=-1.0, high=1.0).transpose(1, 2).to(torch.float16)
    assert not x.is_contiguous() and not grid.is_contiguous()
    _check_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def test_grid_sample_integer_grid_and_empty_batch():
    # the torch op casts any grid to x's dtype; an integer grid holds the corners and centre
    x = _rand(1, 2, 3, 5, seed=155)
    grid = torch.tensor([[[[-1, -1], [0, 0], [1, 1]]]], device=DEVICE)  # (1, 1, 3, 2) int64
    _check_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = gs.grid_sample(x[:0], grid[:0].float())
    assert tuple(out.shape) == (0, 2, 1, 3)


def _check_affine(x, theta, out_size, **kw):
    out = gs.affine_grid_sample(x, theta, out_size, **kw)
    grid = reference.affine_grid(_np(theta), tuple(out_size), kw.get("align_corners", False))
    _check(out, reference.grid_sample(_np(x), grid, **kw), x)


def _theta(n: int, r: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    # near-identity affine maps with a rotation-ish part and a translation
    eye = torch.eye(r, r + 1)
    return (eye + 0.4 * _rand(n, r, r + 1, seed=seed).cpu()).to(dtype).to(DEVICE)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_affine_grid_sample_4d(mode, padding_mode, align_corners):
    x = _rand(2, 3, 5, 6, seed=160)
    _check_affine(x, _theta(2, 2, seed=161), [4, 7], mode=mode, padding_mode=padding_mode,
                  align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_affine_grid_sample_5d(mode, padding_mode, align_corners):
    x = _rand(2, 2, 3, 4, 5, seed=170)
    _check_affine(x, _theta(2, 3, seed=171), [2, 3, 4], mode=mode, padding_mode=padding_mode,
                  align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_sample_size_one_output_axes(align_corners):
    # an output axis of size 1 sits at coordinate 0 whatever align_corners says
    x = _rand(1, 2, 3, 4, 5, seed=180)
    _check_affine(x, _theta(1, 3, seed=181), [1, 3, 1], align_corners=align_corners)


def test_affine_grid_sample_float64_theta():
    x = _rand(2, 3, 4, 5, seed=185)
    _check_affine(x, _theta(2, 2, seed=186, dtype=torch.float64), [3, 6], mode="bilinear",
                  padding_mode="border", align_corners=True)


@pytest.mark.parametrize("r", [2, 3])
def test_affine_grid_sample_fp16(r):
    x = _rand(1, 3, *([4, 5, 6][-r:]), seed=190, dtype=torch.float16)
    _check_affine(x, _theta(1, r, seed=191, dtype=torch.float16), [3, 4, 5][-r:], mode="bilinear",
                  padding_mode="zeros", align_corners=False)


def test_grid_sample_bad_arguments():
    x = torch.zeros(1, 2, 4, 4, device=DEVICE)
    with pytest.raises(AttnserveError, match="needs a grid of shape"):
        gs.grid_sample(x, torch.zeros(1, 2, 2, 2, 3, device=DEVICE))  # 3-D grid for a 4-D input
    with pytest.raises(AttnserveError, match="needs a grid of shape"):
        gs.grid_sample(x, torch.zeros(1, 2, 2, 3, device=DEVICE))
    with pytest.raises(AttnserveError, match="mode must be one of"):
        gs.grid_sample(x, torch.zeros(1, 2, 2, 2, device=DEVICE), mode="bicubic")
    with pytest.raises(AttnserveError, match="padding_mode must be one of"):
        gs.grid_sample(x, torch.zeros(1, 2, 2, 2, device=DEVICE), padding_mode="wrap")
    with pytest.raises(AttnserveError, match="grid batch"):
        gs.grid_sample(x, torch.zeros(2, 2, 2, 2, device=DEVICE))
    with pytest.raises(AttnserveError, match="4-D"):
        gs.grid_sample(x[0], torch.zeros(1, 2, 2, 2, device=DEVICE))
    with pytest.raises(AttnserveError, match="float32 or float16"):
        gs.grid_sample(x.double(), torch.zeros(1, 2, 2, 2, device=DEVICE))


def test_affine_grid_sample_bad_arguments():
    x = torch.zeros(2, 2, 4, 4, device=DEVICE)
    theta = torch.zeros(2, 2, 3, device=DEVICE)
    with pytest.raises(AttnserveError, match="theta of shape"):
        gs.affine_grid_sample(x, torch.zeros(2, 3, 4, device=DEVICE), [3, 3])
    with pytest.raises(AttnserveError, match="positive output sizes"):
        gs.affine_grid_sample(x, theta, [3, 3, 3])
    with pytest.raises(AttnserveError, match="positive output sizes"):
        gs.affine_grid_sample(x, theta, [3, 0])
    with pytest.raises(AttnserveError, match="theta batch"):
        gs.affine_grid_sample(x, theta[:1], [3, 3])
    with pytest.raises(AttnserveError, match="mode must be one of"):
        gs.affine_grid_sample(x, theta, [3, 3], mode="area")


# --- packaging and ahead-of-time compilation ---------------------------------------------------

def test_package_exposes_launchers_lazily():
    import attnserve.ops.kernels as kernels

    assert kernels.grid_sample is gs.grid_sample
    assert kernels.affine_grid_sample is gs.affine_grid_sample
    assert kernels.window_attention is wa.window_attention
    with pytest.raises(AttributeError):
        kernels.no_such_kernel  # noqa: B018


_AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnserve.ops.kernels import grid_sample_triton as gs
    from attnserve.ops.kernels import window_attention_triton as wa

    def compile_(fn, pointers, ints, consts):
        sig = {**pointers, **{n: "i32" for n in ints}, **{n: "constexpr" for n in consts}}
        if "scale" in ints:
            sig["scale"] = "fp32"
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 80, 32))
        assert ".entry " + fn.__name__ in k.asm["ptx"], fn.__name__
        print(fn.__name__, "ok")

    sizes = ["C", "D", "H", "W"]
    flags = dict(NEAREST=False, PADDING=2, ALIGN_CORNERS=False, BLOCK_P=128, BLOCK_C=16)
    compile_(gs._grid_sample_kernel, {"x_ptr": "*fp16", "grid_ptr": "*fp16", "out_ptr": "*fp16"},
             sizes + ["P"], dict(IS_3D=True, **flags))
    compile_(gs._affine_grid_sample_kernel, {"x_ptr": "*fp32", "theta_ptr": "*fp32", "out_ptr": "*fp32"},
             sizes + ["Do", "Ho", "Wo"], dict(IS_3D=False, **flags))
    ints = "H S0 S1 D K1 K W0 W1 START0 START1 STEP0 STEP1 SHIFT0 SHIFT1 scale".split()
    ptrs = {n: "*fp16" for n in ("q_ptr", "k_ptr", "v_ptr", "bias_ptr", "mask_ptr", "out_ptr")}
    for block in (True, False):
        compile_(wa._window_attention_kernel, ptrs, ints,
                 dict(BLOCK_MODE=block, CAUSAL=True, HAS_BIAS=True, BIAS_PER_QUERY=not block,
                      HAS_MASK=block, BLOCK_Q=64, BLOCK_D=32))
""")


def test_kernels_compile_to_ptx_for_sm80(tmp_path):
    # The interpreter is lenient; the TensorRT plugins will compile the kernels ahead of
    # time, so check the real compiler accepts them (no GPU needed; a separate process,
    # since triton.jit here made interpreted functions).
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split().count("ok") == 4, (done.stdout, triton.__version__)
