"""Handwriting synthesis: a stack of LSTMs writing pen offsets, steered by a soft window
over the text.

Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
https://arxiv.org/abs/1308.0850 (sec. 2, 4.1 and 5, fig. 12)

The input is a pen trajectory x_t = (dx, dy, pen_lifted) (eq. 15) and a character
sequence c = (c_1, ..., c_U), one-hot over a character vocabulary. Implemented:

- the soft window (sec. 5.1), from the first layer's output h^1_t:
  (alpha_hat, beta_hat, kappa_hat) = W h^1_t + b (eq. 48); alpha = exp(alpha_hat),
  beta = exp(beta_hat) (eq. 49-50); kappa_t = kappa_{t-1} + exp(kappa_hat) (eq. 51);
  phi(t, u) = sum_k alpha_k exp(-beta_k (kappa_k - u)^2), u = 1..U (eq. 46);
  w_t = sum_u phi(t, u) c_u (eq. 47). Characters past a sequence's text length get
  phi = 0, so padding a batch changes nothing;
- the LSTM stack with skip connections (eq. 52-53): layer 1 reads x_t, w_{t-1} and its
  own previous state; layer n > 1 reads x_t, h^{n-1}_t, w_t and its own previous state;
- the output layer reads every layer (eq. 3: y_hat_t = b_y + sum_n W_{h^n y} h^n_t),
  split into the mixture density of sec. 4.1 (eq. 17): the end-of-stroke probability
  e = 1 / (1 + exp(e_hat)) (eq. 18), M bivariate Gaussians with weights
  pi = softmax(pi_hat) (eq. 19), means mu = mu_hat (eq. 20), standard deviations
  sigma = exp(sigma_hat) (eq. 21) and correlations rho = tanh(rho_hat) (eq. 22);
- the sampling bias b of sec. 5.4: sigma = exp(sigma_hat - b) (eq. 61),
  pi = softmax(pi_hat (1 + b)) (eq. 62); b = 0 is the unbiased distribution;
- phi(t, U + 1), the window's weight one character past the end of each text, which the
  stopping heuristic of sec. 5.3 compares with phi(t, u <= U).

The LSTM cells are PyTorch's, without the peephole connections of eq. 7-11.

Exported three ways: the whole teacher-forced graph (strokes and text in, the mixture
per point out, for scoring; the stroke count is fixed, the text length dynamic), and the
two parts sampling uses (`export_parts`): the encoder, run once per text, and one step
with the recurrent state in and out. In the whole graph only layer 1 and the window are
unrolled; the layers above run over the sequence as ONNX LSTM nodes. Sampling itself
(numpy, no torch) is `attnserve.runtime.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.ops.recurrent import lstm_layer_op
from attnserve.runtime.sampling import STATE_NAMES, STATIC_NAMES
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec

POINT_DIM = 3  # (dx, dy, pen_lifted)


@dataclass(frozen=True)
class HandwritingConfig:
    # Sec. 5.2: one-hot characters of size 57. Ours: the four reserved ids, space and
    # the 52 letters; anything else is <unk>, as the paper's 'non-letter' label
    # (attnserve.runtime.sampling.handwriting_vocabulary).
    vocab_size: int = 57
    hidden_dim: int = 400  # sec. 5.2: three hidden layers of 400 LSTM cells
    num_layers: int = 3
    window_gaussians: int = 10  # K
    mixture_components: int = 20  # M
    # Shapes used for example inputs; the text length is dynamic in every graph.
    example_text_len: int = 12
    stroke_len: int = 10  # the teacher-forced graph unrolls this many points


class HandwritingSynthesis(nn.Module):
    def __init__(self, cfg: HandwritingConfig):
        super().__init__()
        if cfg.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {cfg.num_layers}")
        self.cfg = cfg
        V, H, K, M = cfg.vocab_size, cfg.hidden_dim, cfg.window_gaussians, cfg.mixture_components
        # Layer 1 sees the previous window w_{t-1} (eq. 52); the others see the current
        # one and the layer below (eq. 53). The input x_t reaches every layer.
        self.layers = nn.ModuleList([nn.LSTMCell(POINT_DIM + V, H)] + [
            nn.LSTMCell(POINT_DIM + H + V, H) for _ in range(cfg.num_layers - 1)
        ])
        self.window_params = nn.Linear(H, 3 * K)  # W_{h^1 p}, b_p (eq. 48)
        self.mixture_params = nn.Linear(cfg.num_layers * H, 1 + 6 * M)  # W_{h^n y}, b_y (eq. 3)

    # -- the two parts -------------------------------------------------------------
    def encode(self, text: torch.Tensor, text_lengths: torch.Tensor):
        """text (B, U) ids, text_lengths (B,) -> characters (B, U, V) one-hot, text_mask
        (B, U) (1 for real characters), and the zero initial state: hidden and cell
        (B, L, H), window w_0 (B, V), kappa_0 (B, K)."""
        cfg = self.cfg
        dtype = self.window_params.weight.dtype  # float16 in a half-precision export
        vocab = torch.arange(cfg.vocab_size, device=text.device)
        characters = (text.unsqueeze(-1) == vocab).to(dtype)
        positions = torch.arange(text.shape[1], device=text.device).unsqueeze(0)
        text_mask = (positions < text_lengths.unsqueeze(1)).to(dtype)
        batch = text.shape[0]
        hidden = characters.new_zeros(batch, cfg.num_layers, cfg.hidden_dim)
        window = characters.new_zeros(batch, cfg.vocab_size)
        kappa = characters.new_zeros(batch, cfg.window_gaussians)
        return characters, text_mask, hidden, torch.zeros_like(hidden), window, kappa

    def step(self, stroke, characters, text_mask, bias, hidden, cell, window, kappa):
        """One point: stroke x_t (B, 3), bias b (B,) -> the mixture for x_{t+1} (weights
        (B, M), means and standard deviations (B, M, 2), correlations (B, M),
        end-of-stroke probability (B,)), the next hidden, cell, window and kappa, the
        window weights phi(t, u) (B, U) and phi(t, U + 1) (B,)."""
        h, c = _lstm_cell(self.layers[0], torch.cat([stroke, window], dim=-1), hidden[:, 0], cell[:, 0])
        positions = _positions(characters)
        window, kappa, phi, alpha, beta = self._window(h, kappa, characters, text_mask, positions)
        next_hidden, next_cell = [h], [c]
        for layer, lstm in enumerate(self.layers[1:], start=1):
            h, c = _lstm_cell(lstm, torch.cat([stroke, h, window], dim=-1), hidden[:, layer], cell[:, layer])
            next_hidden.append(h)
            next_cell.append(c)
        past_end = text_mask.sum(dim=1, keepdim=True) + 1  # U + 1 of each text, (B, 1)
        phi_past_end = _window_weights(alpha, beta, kappa, past_end).squeeze(1)
        return (*self._mixture(torch.cat(next_hidden, dim=-1), bias), torch.stack(next_hidden, dim=1),
                torch.stack(next_cell, dim=1), window, kappa, phi, phi_past_end)

    def forward(self, strokes: torch.Tensor, text: torch.Tensor, text_lengths: torch.Tensor):
        """Teacher forcing, unbiased: strokes (B, T, 3) -> per point the mixture for the
        next one, weights (B, T, M), means and standard deviations (B, T, M, 2),
        correlations (B, T, M), end-of-stroke probability (B, T), and phi (B, T, U)."""
        characters, text_mask, hidden, cell, window, kappa = self.encode(text, text_lengths)
        positions = _positions(characters)
        h, c = hidden[:, 0], cell[:, 0]
        first_layer, windows, phis = [], [], []
        # Layer 1 and the window feed each other point by point (eq. 48-52), so they are
        # unrolled; the layers above only read their outputs and run over the whole
        # sequence at once, as ONNX LSTM nodes (attnserve::lstm_layer).
        for t in range(strokes.shape[1]):
            h, c = _lstm_cell(self.layers[0], torch.cat([strokes[:, t], window], dim=-1), h, c)
            window, kappa, phi, _, _ = self._window(h, kappa, characters, text_mask, positions)
            first_layer.append(h)
            windows.append(window)
            phis.append(phi)
        below, windows = torch.stack(first_layer, dim=1), torch.stack(windows, dim=1)
        full_length = torch.full_like(text_lengths, strokes.shape[1])
        layer_outputs = [below]
        for lstm in self.layers[1:]:
            below, _, _ = lstm_layer_op(torch.cat([strokes, below, windows], dim=-1), full_length,
                                        lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh)
            layer_outputs.append(below)
        return (*self._mixture(torch.cat(layer_outputs, dim=-1), None), torch.stack(phis, dim=1))

    def _window(self, h1, kappa, characters, text_mask, positions):
        """The soft window from layer 1's output h1 (B, H): -> w_t (B, V), kappa_t (B, K),
        phi (B, U), alpha and beta (B, K)."""
        alpha, beta, kappa_step = torch.exp(self.window_params(h1)).split(self.cfg.window_gaussians, dim=-1)
        kappa = kappa + kappa_step  # eq. 51: the window only moves forward
        phi = _window_weights(alpha, beta, kappa, positions) * text_mask  # (B, U)
        window = torch.bmm(phi.unsqueeze(1), characters).squeeze(1)  # eq. 47
        return window, kappa, phi, alpha, beta

    def _mixture(self, hidden: torch.Tensor, bias: torch.Tensor | None):
        """Every layer's output (..., L * H) -> pi, mu, sigma, rho, e (eq. 3, 17-22), with
        the bias (B,) of eq. 61-62 unless `bias` is None."""
        M = self.cfg.mixture_components
        y = self.mixture_params(hidden)  # eq. 3: y_hat = b_y + sum_n W_{h^n y} h^n
        e_hat, pi_hat, mu_hat, sigma_hat, rho_hat = y.split([1, M, 2 * M, 2 * M, M], dim=-1)
        if bias is not None:
            b = bias.unsqueeze(-1)
            pi_hat = pi_hat * (1 + b)  # eq. 62
            sigma_hat = sigma_hat - b  # eq. 61
        weights = pi_hat.softmax(dim=-1)  # eq. 19
        # y holds (mu1, mu2) and (sigma1, sigma2) component by component.
        means = mu_hat.unflatten(-1, (M, 2))  # eq. 20
        stddevs = torch.exp(sigma_hat).unflatten(-1, (M, 2))  # eq. 21
        correlations = torch.tanh(rho_hat)  # eq. 22
        end_of_stroke = torch.sigmoid(-e_hat).squeeze(-1)  # eq. 18: 1 / (1 + exp(e_hat))
        return weights, means, stddevs, correlations, end_of_stroke

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        V, H, L = cfg.vocab_size, cfg.hidden_dim, cfg.num_layers
        # The sampler finds the tensors by these names.
        static_shapes = dict(zip(STATIC_NAMES, [("batch", "text_len", V), ("batch", "text_len")],
                                 strict=True))
        state_shapes = dict(zip(STATE_NAMES, [("batch", L, H), ("batch", L, H), ("batch", V),
                                              ("batch", cfg.window_gaussians)], strict=True))
        static = tuple(TensorSpec(n, "float32", shape) for n, shape in static_shapes.items())
        state = tuple(TensorSpec(n, "float32", shape) for n, shape in state_shapes.items())
        next_state = tuple(TensorSpec(f"next_{n}", "float32", shape) for n, shape in state_shapes.items())
        dims = {"text_len": cfg.example_text_len}
        encoder = ModelSpec("handwriting_synthesis.encoder", "part", "encoder", _text_specs(cfg),
                            static + state, dims)
        step = ModelSpec(
            "handwriting_synthesis.decoder_step", "part", "decoder-step",
            (TensorSpec("stroke", "float32", ("batch", POINT_DIM)),) + static
            + (TensorSpec("bias", "float32", ("batch",)),) + state,
            _mixture_specs(cfg, ()) + next_state
            + (TensorSpec("attention", "float32", ("batch", "text_len")),
               TensorSpec("attention_past_end", "float32", ("batch",))),
            dims,
        )
        return encoder_and_step(self, encoder, step)


def _positions(characters: torch.Tensor) -> torch.Tensor:
    """u = 1 .. U: character positions count from 1 in eq. 46."""
    # Counted in integers and then cast: a float range would keep float32 bounds in a
    # half-precision graph.
    return torch.arange(1, characters.shape[1] + 1, device=characters.device).to(characters.dtype)


def _lstm_cell(lstm: nn.LSTMCell, x, h, c):
    """nn.LSTMCell's step on its weights (gates i, f, g, o), written out: it traces to
    fewer operations than the module, which keeps exporting the unrolled graph quick."""
    gates = F.linear(x, lstm.weight_ih, lstm.bias_ih) + F.linear(h, lstm.weight_hh, lstm.bias_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _window_weights(alpha, beta, kappa, positions):
    """phi at `positions` (U,) or (B, U): sum_k alpha_k exp(-beta_k (kappa_k - u)^2) (eq. 46),
    with alpha, beta, kappa (B, K) -> (B, U)."""
    distance = kappa.unsqueeze(2) - positions.unsqueeze(-2)  # (B, K, U)
    return (alpha.unsqueeze(2) * torch.exp(-beta.unsqueeze(2) * distance.square())).sum(dim=1)


def _text_specs(cfg: HandwritingConfig) -> tuple[TensorSpec, ...]:
    return (TensorSpec("text", "int64", ("batch", "text_len"), (4, cfg.vocab_size)),
            # Lengths from 1 to the example length: padded batches in every example.
            TensorSpec("text_lengths", "int64", ("batch",), (1, cfg.example_text_len + 1)))


def _mixture_specs(cfg: HandwritingConfig, time: tuple) -> tuple[TensorSpec, ...]:
    """The mixture density outputs, per point: `time` is () for one step, (T,) for all."""
    M = cfg.mixture_components
    return (TensorSpec("mixture_weights", "float32", ("batch", *time, M)),
            TensorSpec("means", "float32", ("batch", *time, M, 2)),
            TensorSpec("stddevs", "float32", ("batch", *time, M, 2)),
            TensorSpec("correlations", "float32", ("batch", *time, M)),
            TensorSpec("end_of_stroke", "float32", ("batch", *time)))


CONFIGS = {
    "tiny": HandwritingConfig(vocab_size=31, hidden_dim=16, window_gaussians=3, mixture_components=4,
                              example_text_len=6, stroke_len=3),
    # The synthesis network of sec. 5.2 (about 3.7M weights).
    "base": HandwritingConfig(),
}


def handwriting_spec(name: str, config_name: str, cfg: HandwritingConfig) -> ModelSpec:
    """The whole teacher-forced graph: strokes and text in, the mixture per point out."""
    return ModelSpec(
        name=name, config=config_name, task="handwriting-synthesis",
        inputs=(TensorSpec("strokes", "float32", ("batch", cfg.stroke_len, POINT_DIM)),) + _text_specs(cfg),
        outputs=_mixture_specs(cfg, (cfg.stroke_len,))
        + (TensorSpec("attention", "float32", ("batch", cfg.stroke_len, "text_len")),),
        default_dims={"text_len": cfg.example_text_len},
        tolerances=dict(DEFAULT_TOLERANCES),
        vocab_sizes={"source": cfg.vocab_size},  # the characters to write
    )


register_model(
    "handwriting_synthesis",
    configs=CONFIGS,
    spec=handwriting_spec,
    paper="Graves, Generating Sequences With Recurrent Neural Networks, 2013 (arXiv:1308.0850)",
)(HandwritingSynthesis)
