"""Recurrent Attention Model (RAM).

Mnih, Heess, Graves and Kavukcuoglu, "Recurrent Models of Visual Attention", NeurIPS
2014. https://arxiv.org/abs/1406.6247

The model never sees the whole image. At each of N steps it takes a glimpse around a
location l_{t-1} and updates a recurrent state h_t, from which it chooses where to look
next; after the last glimpse it classifies (sec. 3, fig. 1):

- glimpse sensor rho(x, l): k square patches centred on l, the first g x g pixels, each
  next one twice as wide, all resized to g x g (sec. 3.1, "retina-like");
- glimpse network f_g: h_g = Rect(Linear(rho)), h_l = Rect(Linear(l)),
  g_t = Rect(Linear(h_g) + Linear(h_l)), with h_g and h_l of 128 units and g_t of 256
  (sec. 4.1);
- core network f_h: the rectifier RNN h_t = Rect(Linear(h_{t-1}) + Linear(g_t)) of the
  classification experiments, 256 units (sec. 4.1); an LSTM core (the dynamic
  environment's, sec. 4.2) is a config option;
- location network f_l: the mean of a two-component Gaussian policy with fixed variance,
  f_l(h) = Linear(h) (sec. 4.1). Training samples l_t from it (REINFORCE); inference takes
  the mean, so the exported graph is a deterministic function of the image. With
  `sample_locations=True` it instead takes a `location_noise` input (standard normal,
  (batch, N, 2)) and looks at l_t = f_l(h_t) + sigma * noise_t: a sampled scan path that
  is a deterministic function of the noise, which `attnserve.postprocess_ram.
  sample_location_noise(batch, N, seed)` draws from a seed;
- action network f_a: Linear(h_N), the class logits (softmax in the paper, sec. 4.1).

Locations are in the paper's coordinates: (0, 0) is the image centre, (-1, -1) its
top-left corner and (1, 1) its bottom-right one (sec. 4.1), x first; they are those of
`grid_sample` with align_corners=False (the corners of the corner pixels). The first
location is the policy's mean from the zero state, l_0 = f_l(h_0 = 0) (a learnt
constant; the paper does not say how l_0 is chosen, and Leonard's Torch RecurrentAttention
module, the widely used reimplementation, also starts from a zero state), and the model
outputs the N locations it glimpsed at, l_0 .. l_{N-1}. The locations are not clipped:
f_l is linear in the paper, and a patch beyond the image reads zeros.

The sensor is written with `attnserve::affine_grid_sample` (one AffineGridSampler node per
scale and step): patch j (of w = g 2^j pixels) is sampled bilinearly on a w x w grid of
pixel spacing, theta = [[w / W, 0, l_x], [0, w / H, l_y]], then averaged over 2^j x 2^j
blocks (AveragePool), so that each g x g output pixel is the mean of the pixels it
covers (area resizing; a single bilinear tap per output pixel would skip most of the
pixels of the coarse patches). At locations on the pixel grid the scale-0 patch is the
crop itself. Pixels outside the image read as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.errors import InputError
from attnserve.models.layers.lstm_step import lstm_step
from attnserve.models.registry import register_model
from attnserve.ops import affine_grid_sample
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec, image_preprocessing

CORES = ("rnn", "lstm")


@dataclass(frozen=True)
class RAMConfig:
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    num_glimpses: int = 6  # N
    patch_size: int = 8  # g: the retina's finest patch, and every patch's resized size
    num_scales: int = 1  # k patches, each twice as wide as the one before
    glimpse_hidden: int = 128  # h_g (sec. 4.1)
    location_hidden: int = 128  # h_l (sec. 4.1)
    glimpse_dim: int = 256  # g_t (sec. 4.1)
    hidden_size: int = 256  # the core's state (sec. 4.1)
    core: str = "rnn"  # "rnn": rectifier RNN (sec. 4.1); "lstm": LSTM units (sec. 4.2)
    # The policy's fixed standard deviation (the paper does not state it; 0.11 is the default
    # `--locatorStd` of Leonard's Torch RAM example). Used only when sampling.
    location_std: float = 0.11
    # False: look at the policy's mean (deterministic inference). True: the graph takes
    # `location_noise` (batch, N, 2) and looks at mean + location_std * noise.
    sample_locations: bool = False


def glimpse_sensor(images: torch.Tensor, locations: torch.Tensor, patch_size: int,
                   num_scales: int) -> torch.Tensor:
    """rho(x, l): (B, C, H, W) images, (B, 2) locations (x, y) in [-1, 1] ->
    (B, num_scales * C, g, g), the patches finest first, each resized to g x g by area
    averaging (see the module docstring)."""
    _, _, height, width = images.shape
    patches = []
    for j in range(num_scales):
        size = patch_size * 2**j  # pixels of patch j per side
        # theta = [[w / W, 0, l_x], [0, w / H, l_y]]: the unit square of the output grid
        # onto w x w pixels centred on l (align_corners=False: 2 / W per pixel).
        scale = images.new_tensor([[size / width, 0.0, 0.0], [0.0, size / height, 0.0]])
        shift = images.new_tensor([0.0, 0.0, 1.0])
        theta = scale + locations.unsqueeze(-1) * shift  # (B, 2, 3)
        patch = affine_grid_sample(images, theta, (size, size))  # (B, C, w, w) at pixel spacing
        if j:
            patch = F.avg_pool2d(patch, 2**j)  # (B, C, g, g): the mean of 2^j x 2^j pixels
        patches.append(patch)
    return torch.cat(patches, dim=1)


class RecurrentAttentionModel(nn.Module):
    """RAM: images (B, C, S, S) [, location_noise (B, N, 2)] -> class logits (B, classes)
    and the glimpse locations (B, N, 2)."""

    def __init__(self, cfg: RAMConfig):
        super().__init__()
        if cfg.core not in CORES:
            raise InputError(f"RAM's core must be one of {CORES}, got {cfg.core!r}")
        if cfg.num_glimpses < 1 or cfg.num_scales < 1 or cfg.patch_size < 1:
            raise InputError(f"RAM needs at least one glimpse, one scale and a patch of a pixel; got "
                             f"num_glimpses={cfg.num_glimpses}, num_scales={cfg.num_scales}, "
                             f"patch_size={cfg.patch_size}")
        self.cfg = cfg
        retina = cfg.num_scales * cfg.in_chans * cfg.patch_size**2
        # Glimpse network (sec. 4.1): g = Rect(Linear(h_g) + Linear(h_l)).
        self.glimpse_fc = nn.Linear(retina, cfg.glimpse_hidden)
        self.location_fc = nn.Linear(2, cfg.location_hidden)
        self.glimpse_out = nn.Linear(cfg.glimpse_hidden, cfg.glimpse_dim)
        self.location_out = nn.Linear(cfg.location_hidden, cfg.glimpse_dim)
        # Core network.
        if cfg.core == "rnn":  # h_t = Rect(Linear(h_{t-1}) + Linear(g_t))
            self.core_hidden = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.core_input = nn.Linear(cfg.glimpse_dim, cfg.hidden_size)
        else:
            self.core_lstm = nn.LSTMCell(cfg.glimpse_dim, cfg.hidden_size)
        self.locator = nn.Linear(cfg.hidden_size, 2)  # f_l: the policy's mean
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_classes)  # f_a

    def glimpse(self, images: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """The sensor's patches at (B, 2) locations: (B, k C, g, g)."""
        return glimpse_sensor(images, locations, self.cfg.patch_size, self.cfg.num_scales)

    def glimpse_features(self, images: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """g_t = f_g(x, l): (B, glimpse_dim)."""
        h_g = F.relu(self.glimpse_fc(self.glimpse(images, locations).flatten(1)))
        h_l = F.relu(self.location_fc(locations))
        return F.relu(self.glimpse_out(h_g) + self.location_out(h_l))

    def _check(self, images: torch.Tensor, location_noise: torch.Tensor | None) -> None:
        cfg = self.cfg
        want = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise InputError(f"RAM ({cfg.img_size} x {cfg.img_size}) takes images of shape (batch, "
                             f"{', '.join(map(str, want))}); got {tuple(images.shape)}")
        if cfg.sample_locations:
            if location_noise is None:
                raise InputError("this RAM samples its locations (sample_locations=True): pass "
                                 f"location_noise of shape (batch, {cfg.num_glimpses}, 2), e.g. from "
                                 "attnserve.postprocess_ram.sample_location_noise")
            if tuple(location_noise.shape) != (images.shape[0], cfg.num_glimpses, 2):
                raise InputError(f"location_noise must have shape (batch, {cfg.num_glimpses}, 2) = "
                                 f"({images.shape[0]}, {cfg.num_glimpses}, 2); "
                                 f"got {tuple(location_noise.shape)}")
        elif location_noise is not None:
            raise InputError("this RAM looks at the policy's mean (sample_locations=False) and takes no "
                             "location_noise; build it with sample_locations=True to sample")

    def forward(self, images: torch.Tensor,
                location_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(images, location_noise)
        cfg = self.cfg
        h = images.new_zeros(images.shape[0], cfg.hidden_size)  # h_0
        c = torch.zeros_like(h) if cfg.core == "lstm" else None
        locations = []
        for t in range(cfg.num_glimpses):
            loc = self.locator(h)  # the policy's mean for l_t (l_0 from h_0 = 0)
            if location_noise is not None:
                loc = loc + cfg.location_std * location_noise[:, t]
            locations.append(loc)
            h, c = self.core_step(self.glimpse_features(images, loc), h, c)
        return self.classifier(h), torch.stack(locations, dim=1)  # (B, classes), (B, N, 2)

    def core_step(self, g: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """f_h: (h_{t-1}, c_{t-1}), g_t -> (h_t, c_t); c is None for the rectifier core."""
        if self.cfg.core == "rnn":
            return F.relu(self.core_hidden(h) + self.core_input(g)), None
        return lstm_step(self.core_lstm, g, h, c)


def _spec(name: str, config_name: str, cfg: RAMConfig) -> ModelSpec:
    n = cfg.num_glimpses
    inputs = (TensorSpec("images", "float32", ("batch", cfg.in_chans, cfg.img_size, cfg.img_size)),)
    if cfg.sample_locations:
        inputs += (TensorSpec("location_noise", "float32", ("batch", n, 2)),)
    policy = (f"sampled: mean + {cfg.location_std} * location_noise; location_noise standard normal, "
              "attnserve.postprocess_ram.sample_location_noise(batch, num_glimpses, seed)"
              if cfg.sample_locations else "mean: the Gaussian policy's mean, no sampling (deterministic)")
    # MNIST digits in [0, 1], as the paper feeds them; the canvas is the whole input (no
    # crop margin: a translated digit may sit at its edge).
    preprocessing = {**image_preprocessing(cfg.img_size, (0.0,) * cfg.in_chans, (1.0,) * cfg.in_chans),
                     "resize": cfg.img_size,
                     "location_policy": policy,
                     "locations": "(x, y) of each glimpse's centre, (-1, -1) top-left, (1, 1) bottom-right",
                     "patch_size": cfg.patch_size, "num_scales": cfg.num_scales}
    return ModelSpec(
        name=name,
        config=config_name,
        task="image-classification",
        inputs=inputs,
        outputs=(TensorSpec("logits", "float32", ("batch", cfg.num_classes)),
                 TensorSpec("locations", "float32", ("batch", n, 2))),
        tolerances=dict(DEFAULT_TOLERANCES),
        preprocessing=preprocessing,
    )


CONFIGS = {
    # Two scales, so that the tests exercise the area resizing of the coarser patch.
    "tiny": RAMConfig(num_glimpses=3, patch_size=8, num_scales=2, glimpse_hidden=64, location_hidden=16,
                      glimpse_dim=64, hidden_size=64),
    # Table 1a: 28 x 28 MNIST, 6 glimpses of 8 x 8, 1 scale (1.29% error).
    "mnist": RAMConfig(),
    # Table 1b: 60 x 60 translated MNIST, 6 glimpses of 12 x 12, 3 scales (1.86%).
    "translated60": RAMConfig(img_size=60, patch_size=12, num_scales=3),
    # Table 2b: 100 x 100 cluttered translated MNIST, 6 glimpses of 12 x 12, 4 scales (11.58%).
    "cluttered100": RAMConfig(img_size=100, patch_size=12, num_scales=4),
    # Demo (attnserve train digits): 16 x 16 digits on a cluttered 40 x 40 canvas, patches of
    # 8, 16 and 32 pixels (about the digit / patch / canvas proportions of table 1b), 4 glimpses (table 2
    # has 4, 6 and 8). The LSTM core (the paper's for its dynamic environment, sec. 4.2)
    # learns much faster here than the rectifier one within the demo's two-minute budget.
    "digits": RAMConfig(img_size=40, num_glimpses=4, patch_size=8, num_scales=3, glimpse_hidden=128,
                        location_hidden=32, glimpse_dim=128, hidden_size=128, core="lstm",
                        location_std=0.15),
}


register_model(
    "ram",
    configs=CONFIGS,
    spec=_spec,
    paper="Mnih et al., Recurrent Models of Visual Attention, NeurIPS 2014",
    custom_ops=("AffineGridSampler",),
)(RecurrentAttentionModel)
