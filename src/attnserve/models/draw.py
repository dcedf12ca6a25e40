"""DRAW: a recurrent variational auto-encoder that draws with Gaussian attention.

Gregor, Danihelka, Graves, Rezende and Wierstra, "DRAW: A Recurrent Neural Network For
Image Generation", ICML 2015. https://arxiv.org/abs/1502.04623

Implemented as the paper writes it:

- the loop of sec. 2.2 (eq. 3-8): x_hat_t = x - sigmoid(c_{t-1});
  r_t = read(x, x_hat_t, h^dec_{t-1}); h^enc_t = LSTM^enc(h^enc_{t-1}, [r_t, h^dec_{t-1}]);
  z_t ~ Q(Z_t | h^enc_t); h^dec_t = LSTM^dec(h^dec_{t-1}, z_t); c_t = c_{t-1} + write(h^dec_t),
  with c_0, h^enc_0 and h^dec_0 learned biases (the LSTM cell states start at zero);
- the diagonal Gaussian posterior Q: mu_t = W(h^enc_t), sigma_t = exp(W(h^enc_t)) (eq. 1-2),
  and the loss: L^x = -log D(x | c_T), D Bernoulli with means sigmoid(c_T) (eq. 9), and
  L^z = 1/2 (sum_t mu_t^2 + sigma_t^2 - log sigma_t^2) - T/2 (eq. 11) (`DRAW.loss`);
- generation (sec. 2.3, eq. 12-14): z_t ~ N(0, I), h^dec_t = LSTM^dec(h^dec_{t-1}, z_t),
  c_t = c_{t-1} + write(h^dec_t); the image is sigmoid(c_T), D's means;
- the selective attention of sec. 3.2: five parameters (g~_X, g~_Y, log sigma^2,
  log delta~, log gamma) = W(h^dec) (eq. 21), the grid centre g_X = (A + 1)/2 (g~_X + 1),
  g_Y = (B + 1)/2 (g~_Y + 1) (eq. 22-23), stride delta = (max(A, B) - 1)/(N - 1) delta~
  (eq. 24), filter means mu^i_X = g_X + (i - N/2 - 0.5) delta (eq. 19-20) and the
  filterbanks F_X[i, a], F_Y[j, b] of eq. 25-26, normalised over the image axis;
  read = gamma [F_Y x F_X^T, F_Y x_hat F_X^T] (eq. 27); write = 1/gamma^ F^_Y^T w F^_X
  with w = W(h^dec) an N x N patch and its own attention parameters (eq. 28-29); colour
  images use the same filters for every channel (sec. 3.3);
- without attention (sec. 3.1, config `attention=False`): read = [x, x_hat] (eq. 17),
  write = W(h^dec) (eq. 18).

An A x B image is A pixels wide and B high (F_X is N x A, F_Y is N x B, so x is B x A).
Image coordinates a = 1..A and b = 1..B count from 1, as eq. 22 implies: g~_X = 0 then
centres the grid at (A + 1)/2, and with delta~ = 1 the N filters reach from pixel 1 to
pixel A, the "initial patch that roughly covers the whole input image" of sec. 3.2.

The LSTMs are "of the form used in (Graves, 2013)" (sec. 2.1): with peephole connections
(Graves 2013, eq. 7-11; `peepholes=False` gives PyTorch's LSTMCell, for checkpoints of
reimplementations without them).

Exported: generation (`forward`), deterministic given its input, the noise
z_1..z_T as a (batch, T, z_dim) tensor (`attnserve.postprocess_draw.sample_noise` draws
it from a seed): -> the image sigmoid(c_T) and, with attention, the write window of every
step (centre, stride, variance) to show where it draws. Reconstruction (`reconstruct`,
encoder and decoder with z_t = mu_t, the posterior mean) is exported beside it as the
part "reconstruct" (`export_parts`), so one export serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.errors import InputError
from attnserve.models.parts import model_part
from attnserve.models.registry import register_model
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec

# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DRAWConfig:
    height: int = 28  # B
    width: int = 28  # A
    in_chans: int = 1
    steps: int = 64  # T, "#glimpses" of Table 3
    enc_hidden: int = 256  # Table 3's "LSTM #h", for encoder and decoder alike
    dec_hidden: int = 256
    z_dim: int = 100
    attention: bool = True  # False: the no-attention read and write of sec. 3.1
    read_size: int = 2  # N of the read filterbank (Table 3: MNIST 2 x 2)
    write_size: int = 5  # N of the write filterbank (Table 3: MNIST 5 x 5)
    peepholes: bool = True  # Graves 2013's LSTM (sec. 2.1)

    def __post_init__(self):
        for name in ("height", "width", "in_chans", "steps", "enc_hidden", "dec_hidden", "z_dim"):
            if getattr(self, name) < 1:
                raise InputError(f"DRAW's {name} must be at least 1, got {getattr(self, name)}")
        if self.attention:
            for name in ("read_size", "write_size"):
                # eq. 24 divides by N - 1.
                if getattr(self, name) < 2:
                    raise InputError(f"DRAW's {name} (the N of an N x N filterbank) must be at least 2, "
                                     f"got {getattr(self, name)}; eq. 24 divides by N - 1")


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------


class PeepholeLSTMCell(nn.Module):
    """The LSTM of Graves 2013 (eq. 7-11), which DRAW uses (sec. 2.1):

    i = sigmoid(W_xi x + W_hi h + w_ci * c_{t-1} + b_i)
    f = sigmoid(W_xf x + W_hf h + w_cf * c_{t-1} + b_f)
    c_t = f * c_{t-1} + i * tanh(W_xc x + W_hc h + b_c)
    o = sigmoid(W_xo x + W_ho h + w_co * c_t + b_o),  h_t = o * tanh(c_t)

    Weights are laid out as nn.LSTMCell's (gates i, f, g, o; two biases, which sum to
    b), so its state dict loads; `peephole` holds (w_ci, w_cf, w_co). Without peepholes
    it is nn.LSTMCell. Written out step by step: it traces to fewer operations than the
    module, which keeps exporting the unrolled graphs quick.
    """

    def __init__(self, input_size: int, hidden_size: int, peepholes: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        self.peephole = nn.Parameter(torch.empty(3, hidden_size)) if peepholes else None
        bound = hidden_size**-0.5  # nn.LSTMCell's initialisation, for every weight
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        if self.peephole is not None:
            i = i + self.peephole[0] * c
            f = f + self.peephole[1] * c
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if self.peephole is not None:
            o = o + self.peephole[2] * c  # the output gate sees the new cell state (eq. 10)
        return torch.sigmoid(o) * torch.tanh(c), c


class AttentionWindow(NamedTuple):
    """Where N x N grids of Gaussian filters lie (sec. 3.2), over any leading dims (...)."""

    centre: torch.Tensor  # (..., 2): (g_X, g_Y), in pixels counted from 1 (eq. 22-23)
    stride: torch.Tensor  # (...): delta, in pixels (eq. 24)
    variance: torch.Tensor  # (...): sigma^2 of every filter, in pixels^2
    intensity: torch.Tensor  # (...): gamma (eq. 21)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> AttentionWindow:
        """From GaussianAttention's packed (..., 5) = (g_X, g_Y, sigma^2, delta, gamma)."""
        return cls(packed[..., :2], packed[..., 3], packed[..., 2], packed[..., 4])


def filterbanks(gx: torch.Tensor, gy: torch.Tensor, stride: torch.Tensor, variance: torch.Tensor,
                size: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F_X (..., N, A) and F_Y (..., N, B) of eq. 25-26 from the grid centre (g_X, g_Y),
    the stride delta and the variance sigma^2 (each (...)), N = `size`; the reference
    form of what GaussianAttention computes.

    Filter i (1..N) is centred at mu^i = g + (i - N/2 - 0.5) delta (eq. 19-20), pixels at
    a = 1..A (b = 1..B).
    """
    offsets = torch.arange(size, dtype=gx.dtype) - (size - 1) / 2  # i - N/2 - 0.5, i = 1..N
    mu_x = gx.unsqueeze(-1) + offsets * stride.unsqueeze(-1)  # (..., N)
    mu_y = gy.unsqueeze(-1) + offsets * stride.unsqueeze(-1)
    scale = (-0.5 / variance)[..., None, None]
    return (_gaussian_filters(mu_x, torch.arange(1, width + 1, dtype=gx.dtype), scale),
            _gaussian_filters(mu_y, torch.arange(1, height + 1, dtype=gx.dtype), scale))


def _gaussian_filters(mu: torch.Tensor, pixels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows exp(-(a - mu^i)^2 / (2 sigma^2)) / Z (eq. 25-26), Z their sum over the pixels
    a: mu (..., N), pixels (A,), scale = -1 / (2 sigma^2) (..., 1, 1) -> (..., N, A).
    Computed as a softmax over a, which is that same quotient but never 0/0 when a filter
    lies so far outside the image that every exp underflows."""
    return ((pixels - mu.unsqueeze(-1)).square() * scale).softmax(dim=-1)


class GaussianAttention(nn.Module):
    """The attention parameters of one filterbank: a linear layer of h^dec (eq. 21)
    scaled to the image (eq. 22-24), and the filters they define (eq. 25-26)."""

    def __init__(self, hidden: int, size: int, height: int, width: int):
        super().__init__()
        A, B, N = width, height, size
        self.params = nn.Linear(hidden, 5)  # (g~_X, g~_Y, log sigma^2, log delta~, log gamma)
        # Constants, not weights (so not in the state dict); buffers, so a half-precision
        # model has them in half precision. eq. 22-24 as one scale of
        # (g~_X + 1, g~_Y + 1, sigma^2, delta~, gamma):
        scale = [(A + 1) / 2, (B + 1) / 2, 1.0, (max(A, B) - 1) / (N - 1), 1.0]
        self.register_buffer("scale", torch.tensor(scale), persistent=False)
        self.register_buffer("offsets", torch.arange(N) - (N - 1) / 2, persistent=False)  # i - N/2 - 0.5
        self.register_buffer("xs", torch.arange(1, A + 1, dtype=torch.float32), persistent=False)  # a = 1..A
        self.register_buffer("ys", torch.arange(1, B + 1, dtype=torch.float32), persistent=False)  # b = 1..B

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h^dec (..., hidden) -> the window packed as (..., 5) = (g_X, g_Y, sigma^2, delta,
        gamma) (`AttentionWindow.unpack`), F_X (..., N, A) and F_Y (..., N, B)."""
        p = self.params(h)
        packed = torch.cat([p[..., :2] + 1, torch.exp(p[..., 2:])], dim=-1) * self.scale  # eq. 22-24
        mu = packed[..., :2, None] + self.offsets * packed[..., 3, None, None]  # (..., 2, N), eq. 19-20
        scale = (-0.5 / packed[..., 2])[..., None, None]  # -1 / (2 sigma^2)
        return (packed, _gaussian_filters(mu[..., 0, :], self.xs, scale),
                _gaussian_filters(mu[..., 1, :], self.ys, scale))


def read_glimpses(x: torch.Tensor, x_hat: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor,
                  gamma: torch.Tensor) -> torch.Tensor:
    """eq. 27: gamma [F_Y x F_X^T, F_Y x_hat F_X^T], the same filters on every channel.

    x, x_hat (B, C, H, W), F_X (B, N, W), F_Y (B, N, H), gamma (B,) -> (B, 2 C, N, N):
    x's channels, then x_hat's."""
    images = torch.cat([x, x_hat], dim=1)  # (B, 2C, H, W)
    glimpses = fy.unsqueeze(1) @ images @ fx.unsqueeze(1).transpose(-1, -2)  # (B, 2C, N, N)
    return gamma.reshape(-1, 1, 1, 1) * glimpses


def write_patches(patch: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor,
                  gamma: torch.Tensor) -> torch.Tensor:
    """eq. 29: 1/gamma^ F^_Y^T w F^_X, the same filters on every channel.

    patch w (..., C, N, N), F^_X (..., N, W), F^_Y (..., N, H), gamma^ (...) ->
    (..., C, H, W)."""
    fy_t = fy.unsqueeze(-3).transpose(-1, -2)  # (..., 1, H, N)
    return (fy_t @ patch @ fx.unsqueeze(-3)) / gamma[..., None, None, None]


class Generation(NamedTuple):
    image: torch.Tensor  # (B, C, H, W): sigmoid(c_T), D's means
    canvases: torch.Tensor  # (B, T, C, H, W): sigmoid(c_t) after each step, as the paper's figures
    write: AttentionWindow | None  # over (B, T); None without attention


class Trace(NamedTuple):
    """Everything one pass of the encoder and decoder computes (sec. 2.2)."""

    canvases: torch.Tensor  # (B, T, C, H, W): c_t, before the sigmoid
    means: torch.Tensor  # (B, T, z_dim): mu_t
    log_sigmas: torch.Tensor  # (B, T, z_dim): log sigma_t
    read: AttentionWindow | None  # over (B, T), from h^dec_{t-1}
    write: AttentionWindow | None  # over (B, T), from h^dec_t


# ---------------------------------------------------------------------------------------
# DRAW
# ---------------------------------------------------------------------------------------


class DRAW(nn.Module):
    """The DRAW network: encoder and decoder LSTMs exchanging T latent codes, reading
    the image and writing the canvas through Gaussian filterbanks (or whole images
    without attention)."""

    def __init__(self, cfg: DRAWConfig):
        super().__init__()
        self.cfg = cfg
        C, H, W = cfg.in_chans, cfg.height, cfg.width
        read_dim = 2 * C * (cfg.read_size**2 if cfg.attention else H * W)  # r_t
        write_dim = C * (cfg.write_size**2 if cfg.attention else H * W)  # w_t
        self.encoder = PeepholeLSTMCell(read_dim + cfg.dec_hidden, cfg.enc_hidden, cfg.peepholes)  # eq. 5
        self.posterior = nn.Linear(cfg.enc_hidden, 2 * cfg.z_dim)  # (mu_t, log sigma_t), eq. 1-2
        self.decoder = PeepholeLSTMCell(cfg.z_dim, cfg.dec_hidden, cfg.peepholes)  # eq. 7
        self.write_patch = nn.Linear(cfg.dec_hidden, write_dim)  # eq. 28 (eq. 18 without attention)
        if cfg.attention:
            self.read_attention = GaussianAttention(cfg.dec_hidden, cfg.read_size, H, W)
            self.write_attention = GaussianAttention(cfg.dec_hidden, cfg.write_size, H, W)
        else:
            self.read_attention = self.write_attention = None
        # c_0, h^enc_0, h^dec_0: learned biases (sec. 2.2).
        self.canvas0 = nn.Parameter(torch.zeros(C, H, W))
        self.h_enc0 = nn.Parameter(torch.zeros(cfg.enc_hidden))
        self.h_dec0 = nn.Parameter(torch.zeros(cfg.dec_hidden))

    # -- the exported graphs ---------------------------------------------------------------
    def forward(self, noise: torch.Tensor):
        """Generation (eq. 12-14): noise z_1..z_T (B, T, z_dim), standard normal -> image
        sigmoid(c_T) (B, C, H, W) in [0, 1] and, with attention, the write window of
        every step: centre (g_X, g_Y) (B, T, 2), stride (B, T) and variance (B, T)."""
        writes, packed = self._decode(noise)
        image = torch.sigmoid(self.canvas0 + writes.sum(dim=1))  # c_T = c_0 + sum_t write_t
        if packed is None:
            return image
        window = AttentionWindow.unpack(packed)
        return image, window.centre, window.stride, window.variance

    def reconstruct(self, images: torch.Tensor):
        """Encoder and decoder with z_t = mu_t, the posterior mean: images (B, C, H, W) in
        [0, 1] -> the reconstruction sigmoid(c_T) and, with attention, the write and read
        windows of every step (centre, stride, variance each)."""
        trace = self.draw(images)
        image = torch.sigmoid(trace.canvases[:, -1])
        if trace.write is None:
            return image
        w, r = trace.write, trace.read
        return image, w.centre, w.stride, w.variance, r.centre, r.stride, r.variance

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        """The reconstruction graph, exported beside the generation graph."""
        return {"reconstruct": (model_part(self, "reconstruct"), reconstruction_spec(self.cfg))}

    # -- generation ------------------------------------------------------------------------
    def generate(self, noise: torch.Tensor) -> Generation:
        """Generation with every step's canvas (eq. 12-14)."""
        writes, packed = self._decode(noise)  # (B, T, C, H, W)
        canvases = self.canvas0 + writes.cumsum(dim=1)  # c_t = c_0 + sum_{s <= t} write_s
        return Generation(torch.sigmoid(canvases[:, -1]), torch.sigmoid(canvases), _unpack(packed))

    def _decode(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every step's write(h^dec_t) (B, T, C, H, W) and packed write window, from the noise."""
        cfg = self.cfg
        want = (cfg.steps, cfg.z_dim)
        if noise.dim() != 3 or tuple(noise.shape[1:]) != want or not noise.is_floating_point():
            raise InputError(
                f"noise must be a float tensor of shape (batch, T, z_dim) = (batch, {want[0]}, {want[1]}), "
                f"one standard-normal z_t per step (attnserve.postprocess_draw.sample_noise); "
                f"got {noise.dtype} {tuple(noise.shape)}")
        batch = noise.shape[0]
        h = self.h_dec0.expand(batch, -1)
        c = torch.zeros_like(h)
        hidden = []
        for t in range(cfg.steps):  # eq. 13: the decoder alone, driven by the prior's samples
            h, c = self.decoder(noise[:, t], h, c)
            hidden.append(h)
        # eq. 14's writes depend only on h^dec_t: all T at once, after the recurrence.
        return self._write(torch.stack(hidden, dim=1))

    # -- inference -------------------------------------------------------------------------
    def draw(self, images: torch.Tensor, eps: torch.Tensor | None = None) -> Trace:
        """One pass of eq. 3-8 over images (B, C, H, W) in [0, 1]. z_t = mu_t + sigma_t eps_t
        with eps (B, T, z_dim) standard normal (the reparameterisation for training), or
        z_t = mu_t, the posterior mean, when eps is None."""
        cfg = self.cfg
        want = (cfg.in_chans, cfg.height, cfg.width)
        if images.dim() != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
            raise InputError(f"images must be a float tensor of shape (batch, {', '.join(map(str, want))}) "
                             f"with pixels in [0, 1]; got {images.dtype} {tuple(images.shape)}")
        batch = images.shape[0]
        if eps is not None and tuple(eps.shape) != (batch, cfg.steps, cfg.z_dim):
            raise InputError(f"eps must have shape (batch, T, z_dim) = ({batch}, {cfg.steps}, {cfg.z_dim}), "
                             f"got {tuple(eps.shape)}")
        h_enc = self.h_enc0.expand(batch, -1)
        h_dec = self.h_dec0.expand(batch, -1)
        c_enc, c_dec = torch.zeros_like(h_enc), torch.zeros_like(h_dec)
        canvas = self.canvas0.expand(batch, -1, -1, -1)
        canvases, means, log_sigmas, reads, writes = [], [], [], [], []
        for t in range(cfg.steps):
            x_hat = images - torch.sigmoid(canvas)  # eq. 3: the error image
            r, read_window = self._read(images, x_hat, h_dec)  # eq. 4
            h_enc, c_enc = self.encoder(torch.cat([r, h_dec], dim=-1), h_enc, c_enc)  # eq. 5
            mu, log_sigma = self.posterior(h_enc).chunk(2, dim=-1)  # eq. 1-2
            z = mu if eps is None else mu + torch.exp(log_sigma) * eps[:, t]  # eq. 6
            h_dec, c_dec = self.decoder(z, h_dec, c_dec)  # eq. 7
            write, write_window = self._write(h_dec)
            canvas = canvas + write  # eq. 8
            canvases.append(canvas)
            means.append(mu)
            log_sigmas.append(log_sigma)
            reads.append(read_window)
            writes.append(write_window)
        return Trace(torch.stack(canvases, dim=1), torch.stack(means, dim=1), torch.stack(log_sigmas, dim=1),
                     _unpack(_stack(reads)), _unpack(_stack(writes)))

    def loss(self, images: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative variational bound per image (eq. 9-11), with eps (B, T, z_dim)
        standard normal: -> (L^x, L^z), each (B,), in nats. L^x is the Bernoulli
        cross-entropy of images in [0, 1] under means sigmoid(c_T) (eq. 9)."""
        trace = self.draw(images, eps)
        cross_entropy = F.binary_cross_entropy_with_logits(trace.canvases[:, -1], images, reduction="none")
        reconstruction = cross_entropy.sum(dim=(1, 2, 3))
        mu, log_sigma = trace.means, trace.log_sigmas
        # eq. 11: 1/2 sum_t (mu_t^2 + sigma_t^2 - log sigma_t^2) - T/2, summed over z's units.
        latent = 0.5 * (mu.square() + torch.exp(2 * log_sigma) - 2 * log_sigma - 1).sum(dim=(1, 2))
        return reconstruction, latent

    # -- read and write --------------------------------------------------------------------
    def _read(self, x: torch.Tensor, x_hat: torch.Tensor, h_dec: torch.Tensor):
        """r_t (B, read_dim) and its packed window (None without attention)."""
        if self.read_attention is None:
            return torch.cat([x.flatten(1), x_hat.flatten(1)], dim=-1), None  # eq. 17
        packed, fx, fy = self.read_attention(h_dec)
        return read_glimpses(x, x_hat, fx, fy, packed[..., 4]).flatten(1), packed  # eq. 27

    def _write(self, h_dec: torch.Tensor):
        """write(h^dec) (..., C, H, W) for h^dec (..., dec_hidden), and its packed window."""
        cfg = self.cfg
        w = self.write_patch(h_dec)
        if self.write_attention is None:
            return w.unflatten(-1, (cfg.in_chans, cfg.height, cfg.width)), None  # eq. 18
        N = cfg.write_size
        packed, fx, fy = self.write_attention(h_dec)
        patch = w.unflatten(-1, (cfg.in_chans, N, N))  # w_t, eq. 28
        return write_patches(patch, fx, fy, packed[..., 4]), packed  # eq. 29


def _stack(steps: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if steps[0] is None else torch.stack(steps, dim=1)


def _unpack(packed: torch.Tensor | None) -> AttentionWindow | None:
    return None if packed is None else AttentionWindow.unpack(packed)


# ---------------------------------------------------------------------------------------
# Configs, specs and registration
# ---------------------------------------------------------------------------------------

CONFIGS = {
    # Non-square, so that A (width) and B (height) cannot be swapped unnoticed.
    "tiny": DRAWConfig(height=12, width=16, steps=3, enc_hidden=32, dec_hidden=32, z_dim=8,
                       read_size=3, write_size=4),
    # Table 3: binarized MNIST, 28 x 28.
    "mnist": DRAWConfig(),
    # Table 2's "DRAW without attention": the paper gives no sizes of its own; Table 3's MNIST ones.
    "mnist_no_attention": DRAWConfig(attention=False),
    # Table 3: SVHN at 64 x 64 (sec. 4.3), CIFAR-10 at 32 x 32 (sec. 4.4), colour.
    "svhn": DRAWConfig(height=64, width=64, in_chans=3, steps=32, enc_hidden=800, dec_hidden=800,
                       z_dim=100, read_size=12, write_size=12),
    "cifar10": DRAWConfig(height=32, width=32, in_chans=3, steps=64, enc_hidden=400, dec_hidden=400,
                          z_dim=200, read_size=5, write_size=5),
}


def _window_specs(prefix: str, steps: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec(f"{prefix}_centre", "float32", ("batch", steps, 2)),
            TensorSpec(f"{prefix}_stride", "float32", ("batch", steps)),
            TensorSpec(f"{prefix}_variance", "float32", ("batch", steps)))


_WINDOW_NOTE = ("per step t: centre (g_X, g_Y) and stride delta in pixels counted from 1 (pixel "
                "a's centre at a), variance sigma^2; attnserve.postprocess_draw.attention_boxes "
                "turns them into rectangles")


def draw_spec(name: str, config_name: str, cfg: DRAWConfig) -> ModelSpec:
    """Generation: noise (batch, T, z_dim) in, the image sigmoid(c_T) and the write windows out."""
    image = TensorSpec("image", "float32", ("batch", cfg.in_chans, cfg.height, cfg.width))
    return ModelSpec(
        name=name,
        config=config_name,
        # Unconditional: nothing but noise goes in (the "image-generation" task takes a class).
        task="unconditional-image-generation",
        inputs=(TensorSpec("noise", "float32", ("batch", cfg.steps, cfg.z_dim)),),
        outputs=(image,) + (_window_specs("write", cfg.steps) if cfg.attention else ()),
        tolerances=dict(DEFAULT_TOLERANCES),
        # No image comes in; this says where the noise comes from and what the outputs are.
        preprocessing={
            "noise": "z_t ~ N(0, I) for t = 1..T: "
                     "attnserve.postprocess_draw.sample_noise(batch, T, z_dim, seed)",
            "deterministic": True,  # the same noise gives the same image on every backend
            "output_range": [0.0, 1.0], "layout": "NCHW", "color": "RGB" if cfg.in_chans == 3 else "L",
            "postprocess": "attnserve.postprocess_draw.to_uint8_images",
            **({"write_window": _WINDOW_NOTE, "write_size": cfg.write_size} if cfg.attention else {}),
        },
    )


def reconstruction_spec(cfg: DRAWConfig) -> ModelSpec:
    """The "reconstruct" part: images in, sigmoid(c_T) with z_t = mu_t, and the windows, out."""
    shape = ("batch", cfg.in_chans, cfg.height, cfg.width)
    windows = _window_specs("write", cfg.steps) + _window_specs("read", cfg.steps) if cfg.attention else ()
    return ModelSpec(
        name="draw.reconstruct",
        config="part",
        task="image-reconstruction",
        inputs=(TensorSpec("images", "float32", shape),),
        outputs=(TensorSpec("reconstruction", "float32", shape),) + windows,
        tolerances=dict(DEFAULT_TOLERANCES),
        preprocessing={
            "height": cfg.height, "width": cfg.width, "layout": "NCHW",
            "color": "RGB" if cfg.in_chans == 3 else "L",
            "input_range": [0.0, 1.0],  # pixels / 255, no normalisation (binarized MNIST: 0 or 1)
            "deterministic": True,  # z_t is the posterior mean
            **({"write_window": _WINDOW_NOTE, "write_size": cfg.write_size, "read_size": cfg.read_size}
               if cfg.attention else {}),
        },
    )


register_model(
    "draw",
    configs=CONFIGS,
    spec=draw_spec,
    paper="Gregor et al., DRAW: A Recurrent Neural Network For Image Generation, ICML 2015 "
          "(generation; deterministic given the noise input; reconstruction exported as a part)",
)(DRAW)
