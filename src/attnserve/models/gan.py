"""Attention GANs: SAGAN and SelectionGAN.

Zhang, Goodfellow, Metaxas and Odena, "Self-Attention Generative Adversarial Networks",
ICML 2019. https://arxiv.org/abs/1805.08318
Tang, Xu, Yan, Torr, Corso and Sebe, "Multi-Channel Attention Selection GAN with Cascaded
Semantic Guidance for Cross-View Image Translation", CVPR 2019.
https://arxiv.org/abs/1904.06807

SAGAN (`sagan`) is a class-conditional ImageNet generator of residual up-blocks with
conditional batch norm, and one self-attention block (sec. 3, eq. 1-3) where the feature
maps are 64 x 64. Spectral normalisation (Miyato et al. 2018) is on every convolution,
linear layer and embedding of both the generator and the projection discriminator
(sec. 4.1). The layout follows the authors' TensorFlow code (brain-research/
self-attention-gan, `generator_test_64` / `discriminator_test_64`); the attention block is
the paper's final version (f, g and h with C/8 channels, then v back to C). Only the
generator is exported ("image-generation"): z and a class id in, an image in [-1, 1] out.
In eval mode it is a deterministic function of (z, class_id): batch norm uses its moving
statistics and the spectral-norm power iteration is frozen, so all randomness is in z
(`attnserve.postprocess_gan.sample_latents` draws it from a seed).

SelectionGAN (`selection_gan`) translates an image to another view (aerial to ground on
Dayton) guided by the target view's semantic map: stage I, two U-Nets, makes a coarse
image and its semantic map; stage II pools the joint features at several scales
(multi-scale spatial pooling) and its multi-channel attention selection makes N
intermediate images and N attention maps, softmax-normalised across the N per pixel, whose weighted sum is the
final image; an uncertainty map comes from the attention maps. Semantic maps are RGB
colour-coded segmentations (RefineNet's, as the paper and its code use), normalised like
the images to [-1, 1]. The layout follows the authors' code (Ha0Tang/SelectionGAN,
selectiongan_v1), run as its README runs the released models: `--norm batch --eval`, so
the U-Nets use batch norm with moving statistics and no dropout at inference. With the
same weights it gives their Gi/Gs/Ga outputs exactly at 256 x 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from attnserve.errors import InputError
from attnserve.models.registry import register_model
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec

# ---------------------------------------------------------------------------------------
# Spectral normalisation
# ---------------------------------------------------------------------------------------


class _SpectralNormed:
    """Mixin for a layer whose weight is W / sigma(W), with torch's spectral-norm
    parametrization (one power iteration per training forward, as SAGAN trains; u and v
    are buffers, so a checkpoint carries them).

    Eval mode never updates u and v (torch's parametrization iterates only in training),
    so sigma is fixed. For export the normalised weight itself goes into the graph: it is
    kept in the non-persistent buffer `weight_sn`, refreshed whenever the layer enters
    eval mode or a state dict is loaded, and used while torch.export traces; otherwise the
    graph would carry the raw weight, u and v and recompute sigma on every call.
    """

    weight_sn: torch.Tensor

    def _add_spectral_norm(self) -> None:
        # Xavier init as the authors' code (ops.snconv2d / snlinear / sn_embedding), before
        # the parametrization's 15 initial power iterations see the weight.
        nn.init.xavier_uniform_(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)
        spectral_norm(self)
        self.register_buffer("weight_sn", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def sn_weight(self) -> torch.Tensor:
        if not self.training and self.weight_sn.numel() and torch.compiler.is_exporting():
            return self.weight_sn  # exported as an initializer
        return self.weight  # W / sigma; in training this also steps the power iteration

    def refresh_normalised_weight(self) -> None:
        """Store W / sigma for export (u and v as they are: nothing is iterated)."""
        sn = self.parametrizations.weight[0]
        was_training = sn.training
        sn.train(False)
        try:
            # A normal tensor even if called under inference mode; leaving it turns grad
            # mode back on, hence no_grad inside.
            with torch.inference_mode(False), torch.no_grad():
                self.weight_sn = self.weight.detach().clone()
        finally:
            sn.train(was_training)

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.refresh_normalised_weight()
        return self


def _refresh_after_load(module: _SpectralNormed, incompatible_keys) -> None:
    module.refresh_normalised_weight()


class SNConv2d(_SpectralNormed, nn.Conv2d):
    def __init__(self, *args, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._add_spectral_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.sn_weight(), self.bias)


class SNLinear(_SpectralNormed, nn.Linear):
    def __init__(self, *args, **kwargs):
        nn.Linear.__init__(self, *args, **kwargs)
        self._add_spectral_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sn_weight(), self.bias)


class SNEmbedding(_SpectralNormed, nn.Embedding):
    def __init__(self, *args, **kwargs):
        nn.Embedding.__init__(self, *args, **kwargs)
        self._add_spectral_norm()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.sn_weight())


# ---------------------------------------------------------------------------------------
# SAGAN blocks
# ---------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """The self-attention block of SAGAN (sec. 3).

    s_ij = f(x_i)^T g(x_j); beta_{j,i} = softmax over i of s_ij (eq. 1): how much output
    position j attends to position i. o_j = v(sum_i beta_{j,i} h(x_i)) (eq. 2), and
    y = gamma * o + x (eq. 3) with gamma a learned scalar initialised to 0, so the block
    starts as the identity and the network relies on local cues first. f, g, h are
    1 x 1 convolutions to C/8 channels and v back to C (the paper's C-bar = C/k, k = 8),
    spectrally normalised and without bias, as in the authors' code. (Their code gives h
    C/2 channels and max-pools keys and values 2 x 2; the paper does neither.) There is
    no 1/sqrt(d) scaling in eq. 1.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        inner = channels // reduction
        self.f = SNConv2d(channels, inner, 1, bias=False)  # keys
        self.g = SNConv2d(channels, inner, 1, bias=False)  # queries
        self.h = SNConv2d(channels, inner, 1, bias=False)  # values
        self.v = SNConv2d(inner, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> beta (B, N, N), N = H W: row j sums to 1 over positions i."""
        f = self.f(x).flatten(2)  # (B, C/8, N)
        g = self.g(x).flatten(2)  # (B, C/8, N)
        s = g.transpose(1, 2) @ f  # (B, N_j, N_i): s_ij = f(x_i)^T g(x_j)
        return s.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.attention(x)  # (B, N_j, N_i)
        h = self.h(x).flatten(2)  # (B, C/8, N_i)
        o = (h @ beta.transpose(1, 2)).unflatten(2, x.shape[2:])  # (B, C/8, H, W)
        return self.gamma * self.v(o) + x


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class (de Vries et al. 2017;
    as SAGAN's generator uses): gamma_y, beta_y initialised to 1 and 0 for every class."""

    def __init__(self, channels: int, num_classes: int, eps: float, momentum: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma(class_id)[:, :, None, None]  # (B, C, 1, 1)
        beta = self.beta(class_id)[:, :, None, None]
        return self.bn(x) * gamma + beta


class GeneratorBlock(nn.Module):
    """Residual up-block (the authors' `block`): CBN, ReLU, 2x nearest upsampling, 3 x 3
    conv, CBN, ReLU, 3 x 3 conv; the shortcut upsamples and applies a 1 x 1 conv."""

    def __init__(self, cin: int, cout: int, num_classes: int, eps: float, momentum: float):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, num_classes, eps, momentum)
        self.conv1 = SNConv2d(cin, cout, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(cout, num_classes, eps, momentum)
        self.conv2 = SNConv2d(cout, cout, 3, padding=1)
        self.shortcut = SNConv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, class_id)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), class_id)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DiscriminatorBlock(nn.Module):
    """Residual down-block of the SN-GAN/SAGAN discriminator (the authors' `block` and,
    with `first`, `optimized_block`, which has no leading ReLU and pools the shortcut
    before its 1 x 1 conv)."""

    def __init__(self, cin: int, cout: int, downsample: bool = True, first: bool = False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = SNConv2d(cin, cout, 3, padding=1)
        self.conv2 = SNConv2d(cout, cout, 3, padding=1)
        self.shortcut = SNConv2d(cin, cout, 1) if first or downsample or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        if self.first:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        s = x if self.shortcut is None else self.shortcut(x)
        return h + (F.avg_pool2d(s, 2) if self.downsample else s)


# ---------------------------------------------------------------------------------------
# SAGAN
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAGANConfig:
    img_size: int = 128
    z_dim: int = 128
    num_classes: int = 1000
    g_ch: int = 64  # the authors' gf_dim
    # Channels of the 4 x 4 input, then of each up-block's output, in g_ch units.
    g_mults: tuple[int, ...] = (16, 16, 8, 4, 2, 1)
    g_attn_res: int = 64  # "feat64": attention on the 64 x 64 maps (Table 1)
    d_ch: int = 64  # df_dim
    # Each discriminator block's output; all but the last halve the resolution.
    d_mults: tuple[int, ...] = (1, 2, 4, 8, 16, 16)
    d_attn_res: int = 64
    attn_reduction: int = 8  # C-bar = C / 8
    bn_eps: float = 1e-5
    # The authors' conditional batch norms decay their moving averages by 0.999 per step
    # (their final unconditional one by 0.9999; one value serves both here).
    bn_momentum: float = 1e-3

    def __post_init__(self):
        ups = math.log2(self.img_size / 4)
        if not ups.is_integer() or ups < 1:
            raise InputError(f"SAGAN's img_size must be 4 times a power of 2 (8, 16, ..., 128), "
                             f"got {self.img_size}")
        if len(self.g_mults) != ups + 1 or len(self.d_mults) != ups + 1:
            raise InputError(
                f"a {self.img_size} x {self.img_size} SAGAN has {int(ups)} up-blocks and "
                f"{int(ups)} + 1 discriminator blocks: g_mults and d_mults need {int(ups) + 1} "
                f"entries, got {len(self.g_mults)} and {len(self.d_mults)}")
        # The generator's blocks output 8 ... img_size; the discriminator's img_size / 2 ... 4.
        for name, sizes in (("g_attn_res", [4 * 2**i for i in range(1, int(ups) + 1)]),
                            ("d_attn_res", [4 * 2**i for i in range(int(ups))])):
            if (value := getattr(self, name)) not in sizes:
                raise InputError(f"{name} must be one of the feature sizes {sizes}, got {value}")


def _check_class_ids(class_id: torch.Tensor, num_classes: int, batch: int) -> None:
    if class_id.dim() != 1 or class_id.shape[0] != batch:
        raise InputError(f"class_id must have shape (batch,) = ({batch},), got {tuple(class_id.shape)}")
    if class_id.dtype not in (torch.int64, torch.int32):
        raise InputError(f"class_id must be int64, got {class_id.dtype}")
    # Values can be checked only in eager mode; ONNX Runtime's Gather refuses them itself.
    if not torch.compiler.is_exporting():
        bad = class_id[(class_id < 0) | (class_id >= num_classes)]
        if bad.numel():
            raise InputError(f"class_id values must be in [0, {num_classes}), got {bad[:8].tolist()}")


class SAGANGenerator(nn.Module):
    """SAGAN's generator: z -> SN linear to 4 x 4 -> residual up-blocks (self-attention
    after the one that reaches `g_attn_res`) -> BN, ReLU, SN 3 x 3 conv, tanh."""

    def __init__(self, cfg: SAGANConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.g_ch * m for m in cfg.g_mults]
        self.linear = SNLinear(cfg.z_dim, widths[0] * 4 * 4)
        self.blocks = nn.ModuleList(
            GeneratorBlock(cin, cout, cfg.num_classes, cfg.bn_eps, cfg.bn_momentum)
            for cin, cout in zip(widths, widths[1:], strict=False)
        )
        self.attn_after = int(math.log2(cfg.g_attn_res / 4)) - 1  # index of that block
        self.attn = SelfAttention(widths[self.attn_after + 1], cfg.attn_reduction)
        self.bn = nn.BatchNorm2d(widths[-1], eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv_out = SNConv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) float, class_id (B,) int64 in [0, num_classes) -> image (B, 3, S, S)
        in [-1, 1]."""
        if z.dim() != 2 or z.shape[1] != self.cfg.z_dim:
            raise InputError(f"z must have shape (batch, {self.cfg.z_dim}), got {tuple(z.shape)}")
        _check_class_ids(class_id, self.cfg.num_classes, z.shape[0])
        x = self.linear(z).unflatten(1, (-1, 4, 4))  # (B, 16 ch, 4, 4)
        for i, block in enumerate(self.blocks):
            x = block(x, class_id)
            if i == self.attn_after:
                x = self.attn(x)
        return torch.tanh(self.conv_out(F.relu(self.bn(x))))


class SAGANDiscriminator(nn.Module):
    """SAGAN's projection discriminator (Miyato & Koyama 2018): residual down-blocks with
    self-attention after the one that reaches `d_attn_res`, ReLU, global sum pooling phi(x),
    then logit = psi(phi(x)) + embed(y) . phi(x). Trained with the hinge loss (eq. 4);
    not exported."""

    def __init__(self, cfg: SAGANConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.d_ch * m for m in cfg.d_mults]
        cins = [3, *widths[:-1]]
        last = len(widths) - 1
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(cin, cout, downsample=i < last, first=i == 0)
            for i, (cin, cout) in enumerate(zip(cins, widths, strict=True))
        )
        self.attn_after = int(math.log2(cfg.img_size / cfg.d_attn_res)) - 1
        self.attn = SelfAttention(widths[self.attn_after], cfg.attn_reduction)
        self.linear = SNLinear(widths[-1], 1)
        self.embed = SNEmbedding(cfg.num_classes, widths[-1])

    def forward(self, image: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) in [-1, 1], class_id (B,) -> logits (B,)."""
        S = self.cfg.img_size
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, S, S):
            raise InputError(f"image must have shape (batch, 3, {S}, {S}), got {tuple(image.shape)}")
        _check_class_ids(class_id, self.cfg.num_classes, image.shape[0])
        h = image
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_after:
                h = self.attn(h)
        phi = F.relu(h).sum(dim=(2, 3))  # (B, C)
        return self.linear(phi).squeeze(1) + (self.embed(class_id) * phi).sum(dim=1)


def hinge_losses(d_real: torch.Tensor, d_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAGAN's adversarial losses (eq. 4): the discriminator's hinge loss and the
    generator's -D(G(z)), from discriminator logits on real and on generated images."""
    d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    return d_loss, -d_fake.mean()


# ---------------------------------------------------------------------------------------
# SelectionGAN blocks
# ---------------------------------------------------------------------------------------


class UNet(nn.Module):
    """The pix2pix U-Net (Isola et al. 2017; the authors' `UnetGenerator`) whose forward
    also returns the decoder's last features, which stage II uses.

    Level i (0 outermost) maps `outer` to `inner` channels with a stride-2 4 x 4 conv and
    back with a transposed one, batch norm after each but the outermost down, innermost
    down and outermost up (which has tanh); levels 4 to n-2 (8 ngf wide) have dropout
    after their up-path, active only in training. Convolutions followed by batch norm have
    no bias, and nor has the outermost down conv (pix2pix's `use_bias`).
    """

    def __init__(self, in_chans: int, out_chans: int, ngf: int, num_downs: int, dropout: bool = True):
        super().__init__()
        if num_downs < 5:
            raise InputError(f"the U-Net needs at least 5 down-samplings, got {num_downs}")
        inner = [min(ngf * 2**i, ngf * 8) for i in range(num_downs)]
        outer = [out_chans] + inner[:-1]
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in range(num_downs):
            innermost = i == num_downs - 1
            conv = nn.Conv2d(in_chans if i == 0 else outer[i], inner[i], 4, stride=2, padding=1, bias=False)
            self.down.append(conv if i == 0 or innermost else nn.Sequential(conv, nn.BatchNorm2d(inner[i])))
            up_in = inner[i] if innermost else 2 * inner[i]
            if i == 0:
                self.up.append(nn.ConvTranspose2d(up_in, outer[i], 4, stride=2, padding=1))  # then tanh
            else:
                layers = [nn.ConvTranspose2d(up_in, outer[i], 4, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(outer[i])]
                if dropout and 4 <= i < num_downs - 1:
                    layers.append(nn.Dropout(0.5))
                self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in, H, W) -> features (B, 2 ngf, H/2, W/2), image (B, out, H, W) in [-1, 1]."""
        d = [self.down[0](x)]
        skips = []
        for down in self.down[1:]:
            # pix2pix's in-place LeakyReLU rewrites the skip tensor too, so the skip
            # connections carry the activated features; trained weights expect that.
            a = F.leaky_relu(d[-1], 0.2)
            skips.append(a)
            d.append(down(a))
        r = self.up[-1](F.relu(d[-1]))  # innermost up-path
        for i in range(len(self.up) - 2, 0, -1):
            r = self.up[i](F.relu(torch.cat([skips[i], r], dim=1)))
        features = F.relu(torch.cat([skips[0], r], dim=1))  # (B, 2 ngf, H/2, W/2)
        return features, torch.tanh(self.up[0](features))


class MultiScaleSpatialPooling(nn.Module):
    """Multi-scale spatial pooling: average-pool the features F with kernel = stride = s
    for each scale s, upsample back (bilinear), multiply element-wise with F, concatenate
    the products with F and fuse them with a 3 x 3 conv to the input width."""

    def __init__(self, channels: int, pool_sizes: tuple[int, ...]):
        super().__init__()
        self.pool_sizes = pool_sizes
        self.fuse = nn.Conv2d(channels * (len(pool_sizes) + 1), channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        scaled = [
            x * F.interpolate(F.avg_pool2d(x, s), size=size, mode="bilinear", align_corners=True)
            for s in self.pool_sizes
        ]
        return self.fuse(torch.cat([*scaled, x], dim=1))


class AttentionSelection(nn.Module):
    """The multi-channel attention selection module: from the pooled features F',
    N intermediate images I_i = tanh(conv3x3_i(F')) and attention maps
    A = softmax over the N channels of conv1x1(F'), per pixel; the final image is
    sum_i A_i * I_i. The uncertainty map U = sigmoid(conv1x1(A)) (the authors' released
    code; an earlier version took the logits) weights the pixel losses in training."""

    def __init__(self, channels: int, num_generations: int, out_chans: int = 3):
        super().__init__()
        self.num_generations, self.out_chans = num_generations, out_chans
        self.attention = nn.Conv2d(channels, num_generations, 1)
        self.generations = nn.Conv2d(channels, num_generations * out_chans, 3, padding=1)
        self.uncertainty = nn.Conv2d(num_generations, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> final (B, 3, H, W), intermediates (B, N, 3, H, W),
        attention (B, N, H, W), uncertainty (B, 1, H, W)."""
        logits = self.attention(x)  # (B, N, H, W)
        attention = logits.softmax(dim=1)
        generations = torch.tanh(self.generations(x)).unflatten(1, (self.num_generations, self.out_chans))
        final = (generations * attention.unsqueeze(2)).sum(dim=1)  # (B, 3, H, W)
        return final, generations, attention, torch.sigmoid(self.uncertainty(attention))


# ---------------------------------------------------------------------------------------
# SelectionGAN
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionGANConfig:
    img_size: int = 256
    in_chans: int = 3
    semantic_chans: int = 3  # RGB colour-coded semantic maps, as the paper's data
    ngf: int = 64  # G_i's width
    ngf_semantic: int = 4  # G_s's width (the authors' code)
    num_downs: int = 8  # pix2pix's unet_256: 256 -> 1 x 1
    feature_chans: int = 110  # stage II's width: 104 from stage I's features + 2 images
    num_generations: int = 10  # N, the paper's and the authors' code's
    pool_sizes: tuple[int, ...] = (1, 4, 9)  # the authors' code
    dropout: bool = True  # pix2pix's U-Net dropout, training only

    def __post_init__(self):
        if self.img_size % 2**self.num_downs:
            raise InputError(f"img_size {self.img_size} must be a multiple of 2^num_downs = "
                             f"{2**self.num_downs} for the U-Net")
        if self.feature_chans <= 2 * self.in_chans:
            raise InputError(f"feature_chans must exceed the two images' {2 * self.in_chans} channels")


class SelectionOutput(NamedTuple):
    final: torch.Tensor  # (B, 3, H, W) the final image, sum_i A_i I_i
    coarse: torch.Tensor  # (B, 3, H, W) stage I's image
    attention: torch.Tensor  # (B, N, H, W), sums to 1 over N
    uncertainty: torch.Tensor  # (B, 1, H, W) in (0, 1)
    generations: torch.Tensor  # (B, N, 3, H, W) the intermediate images I_i
    coarse_semantics: torch.Tensor  # (B, S, H, W) G_s on the coarse image


class SelectionGAN(nn.Module):
    """SelectionGAN's generator: the cascade G_i, G_s, then stage II's
    multi-scale spatial pooling and multi-channel attention selection."""

    def __init__(self, cfg: SelectionGANConfig):
        super().__init__()
        self.cfg = cfg
        # Stage I: G_i(image, target semantics) -> coarse image; G_s(coarse) -> semantics.
        self.image_generator = UNet(cfg.in_chans + cfg.semantic_chans, cfg.in_chans, cfg.ngf,
                                    cfg.num_downs, cfg.dropout)
        self.semantic_generator = UNet(cfg.in_chans, cfg.semantic_chans, cfg.ngf_semantic,
                                       cfg.num_downs, cfg.dropout)
        # Stage II: both U-Nets' features (at H/2) up to full size, joined with the input
        # and the coarse image (the authors' 136 -> 104 deconvolution, + 6 = 110).
        stage1 = 2 * cfg.ngf + 2 * cfg.ngf_semantic
        self.upsample = nn.ConvTranspose2d(stage1, cfg.feature_chans - 2 * cfg.in_chans, 2, stride=2)
        self.dropout = nn.Dropout(0.5)
        self.pooling = MultiScaleSpatialPooling(cfg.feature_chans, cfg.pool_sizes)
        self.selection = AttentionSelection(cfg.feature_chans, cfg.num_generations, cfg.in_chans)
        self.apply(_pix2pix_init)

    def generate(self, image: torch.Tensor, semantics: torch.Tensor) -> SelectionOutput:
        """Everything the generator makes, intermediate generations included."""
        self._check(image, semantics)
        image_features, coarse = self.image_generator(torch.cat([image, semantics], dim=1))
        semantic_features, coarse_semantics = self.semantic_generator(coarse)
        f = torch.cat([image_features, semantic_features], dim=1)  # (B, 2 ngf + 2 ngf_s, H/2, W/2)
        f = F.relu(self.dropout(self.upsample(f)))  # (B, C - 6, H, W)
        f = self.pooling(torch.cat([f, image, coarse], dim=1))  # (B, C, H, W)
        final, generations, attention, uncertainty = self.selection(f)
        return SelectionOutput(final, coarse, attention, uncertainty, generations, coarse_semantics)

    def forward(self, image: torch.Tensor, semantics: torch.Tensor):
        """image (B, 3, H, W) in [-1, 1], target-view semantics (B, S, H, W) in [-1, 1] ->
        (final, coarse, attention, uncertainty) as the spec's outputs."""
        out = self.generate(image, semantics)
        return out.final, out.coarse, out.attention, out.uncertainty

    def _check(self, image: torch.Tensor, semantics: torch.Tensor) -> None:
        cfg = self.cfg
        step = 2**cfg.num_downs
        if image.dim() != 4 or image.shape[1] != cfg.in_chans or any(n % step for n in image.shape[2:]):
            raise InputError(
                f"image must have shape (batch, {cfg.in_chans}, H, W) with H and W multiples of "
                f"{step} ({cfg.img_size} for this config), got {tuple(image.shape)}")
        want = (image.shape[0], cfg.semantic_chans, *image.shape[2:])
        if tuple(semantics.shape) != want:
            raise InputError(f"semantics must have shape {want} (the target view's RGB semantic map "
                             f"at the image's size), got {tuple(semantics.shape)}")


def _pix2pix_init(m: nn.Module) -> None:
    # The authors' init_weights('normal', 0.02): conv weights N(0, 0.02), batch-norm
    # scales N(1, 0.02), biases 0.
    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------
# Configs, specs and registration
# ---------------------------------------------------------------------------------------

SAGAN_CONFIGS = {
    "tiny": SAGANConfig(img_size=32, z_dim=32, num_classes=10, g_ch=16, g_mults=(4, 4, 2, 1),
                        g_attn_res=16, d_ch=16, d_mults=(1, 2, 4, 4), d_attn_res=16),
    "imagenet128": SAGANConfig(),
}

SELECTION_GAN_CONFIGS = {
    "tiny": SelectionGANConfig(img_size=32, ngf=8, ngf_semantic=4, num_downs=5, feature_chans=22,
                               num_generations=4),
    "dayton": SelectionGANConfig(),  # Dayton (and CVUSA) at 256 x 256
}


def sagan_spec(name: str, config_name: str, cfg: SAGANConfig) -> ModelSpec:
    S = cfg.img_size
    return ModelSpec(
        name=name,
        config=config_name,
        task="image-generation",
        inputs=(TensorSpec("z", "float32", ("batch", cfg.z_dim)),
                TensorSpec("class_id", "int64", ("batch",), (0, cfg.num_classes))),
        outputs=(TensorSpec("image", "float32", ("batch", 3, S, S)),),
        tolerances=dict(DEFAULT_TOLERANCES),
        # No image comes in; this says where z comes from and what the output is.
        preprocessing={"z": "standard normal, attnserve.postprocess_gan.sample_latents(batch, z_dim, seed)",
                       "deterministic": True, "output_range": [-1.0, 1.0], "layout": "NCHW",
                       "color": "RGB", "postprocess": "attnserve.postprocess_gan.to_uint8_images"},
    )


def selection_gan_spec(name: str, config_name: str, cfg: SelectionGANConfig) -> ModelSpec:
    S, N = cfg.img_size, cfg.num_generations
    image = ("batch", cfg.in_chans, S, S)
    return ModelSpec(
        name=name,
        config=config_name,
        task="cross-view-image-translation",
        inputs=(TensorSpec("image", "float32", image),
                TensorSpec("semantics", "float32", ("batch", cfg.semantic_chans, S, S))),
        # "final", not "image": ONNX names are unique and the input is "image".
        outputs=(TensorSpec("final", "float32", image),
                 TensorSpec("coarse", "float32", image),
                 TensorSpec("attention", "float32", ("batch", N, S, S)),
                 TensorSpec("uncertainty", "float32", ("batch", 1, S, S))),
        tolerances=dict(DEFAULT_TOLERANCES),
        # pix2pix's loading: the pair at S x S, scaled to [0, 1], then (x - 0.5) / 0.5.
        preprocessing={"image_size": S, "resize": S, "mean": [0.5] * 3, "std": [0.5] * 3,
                       "color": "RGB", "layout": "NCHW",
                       "semantics": "the target view's RGB colour-coded semantic map, same size "
                                    "and normalisation as the image"},
    )


register_model(
    "sagan",
    configs=SAGAN_CONFIGS,
    spec=sagan_spec,
    paper="Zhang et al., Self-Attention Generative Adversarial Networks, ICML 2019 (generator; "
          "inference is deterministic given z and class_id)",
)(SAGANGenerator)

register_model(
    "selection_gan",
    configs=SELECTION_GAN_CONFIGS,
    spec=selection_gan_spec,
    paper="Tang et al., Multi-Channel Attention Selection GAN with Cascaded Semantic Guidance "
          "for Cross-View Image Translation, CVPR 2019",
)(SelectionGAN)
