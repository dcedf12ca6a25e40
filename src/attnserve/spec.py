"""What a model takes and gives, written down without torch.

A `ModelSpec` is the declarative export description of one registered model in one
configuration: its task, its inputs and outputs (dtypes, shapes with named dynamic
axes), how to make example inputs, and the parity tolerances per precision. Export,
runtime validation, serving and the benchmark all read it, so it lives in a module that
an edge box with only numpy can import; it is also written beside every exported model
as JSON (`ModelSpec.to_dict` / `from_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

Dim = int | str  # an int is a fixed size; a str names a dynamic axis ("batch", "height")
# The one dynamic axis that may be empty: a decoder's key/value cache before the first token.
CACHE_AXIS = "past_len"


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor.

    Attributes:
        name: the graph name, also the key in a Runner's feed and result dicts.
        dtype: a numpy dtype name ("float32", "int64", ...).
        shape: sizes, with a string naming each dynamic axis.
        value_range: for integer inputs, the half-open range example values are drawn
            from (token ids, class ids).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    value_range: tuple[int, int] | None = None

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        missing = [d for d in self.shape if isinstance(d, str) and d not in dims]
        if missing:
            raise KeyError(f"no size given for dynamic axis {missing[0]!r} of {self.name!r}")
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, shape, strict=False)
        )

    def describe_shape(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


@dataclass(frozen=True)
class Tolerance:
    """Element-wise closeness: |got - want| <= atol + rtol * |want|, as numpy.isclose."""

    atol: float
    rtol: float


DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    # fp16 keeps 11 significant bits; logits of O(10) lose ~1e-2 through a deep stack.
    "fp16": Tolerance(atol=5e-2, rtol=5e-2),
}


@dataclass(frozen=True)
class ModelSpec:
    """The export description of one model in one configuration.

    Attributes:
        name: registry name ("vit").
        config: configuration preset name ("tiny", "s16", ...) or "custom".
        task: what the outputs mean ("image-classification", ...).
        inputs, outputs: tensors in graph order.
        default_dims: sizes used for dynamic axes other than "batch" when making
            example inputs (e.g. {"height": 224, "width": 224}).
        tolerances: parity tolerance per precision ("fp32", "fp16").
        preprocessing: how raw data becomes the first input (image size, mean, std,
            colour order); consumed by clients and serving.
        labels: class names where the task has them (None: unnamed classes).
        vocab_sizes: for text models, the size of each vocabulary by role: "source"
            (text in) and "target" (text out). Export saves a vocabulary file per role
            beside the model when given one, and checks its size against this.
    """

    name: str
    config: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    default_dims: Mapping[str, int] = field(default_factory=dict)
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    preprocessing: Mapping[str, object] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    vocab_sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tolerance(self, precision: str = "fp32") -> Tolerance:
        try:
            return self.tolerances[precision]
        except KeyError:
            raise KeyError(
                f"{self.name} has no tolerance for precision {precision!r}; "
                f"known: {', '.join(self.tolerances)}"
            ) from None

    def dims(self, batch_size: int, **overrides: int) -> dict[str, int]:
        return {**self.default_dims, "batch": batch_size, **overrides}

    def example_inputs(self, batch_size: int = 1, seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
        """Random inputs of the right names, dtypes and shapes.

        Floating inputs are standard normal (models take normalised images); integer
        inputs are drawn uniformly from the tensor's `value_range`. `dims` overrides the
        sizes of named dynamic axes, to check a model at shapes other than its export
        shapes.
        """
        rng = np.random.default_rng(seed)
        sizes = self.dims(batch_size, **dims)
        feed = {}
        for t in self.inputs:
            shape = t.concrete_shape(sizes)
            dtype = np.dtype(t.dtype)
            if dtype.kind == "f":
                feed[t.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                low, high = t.value_range or (0, 2)
                feed[t.name] = rng.integers(low, high, size=shape).astype(dtype)
            elif dtype.kind == "b":
                feed[t.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise TypeError(f"cannot make example values of dtype {t.dtype} for {t.name}")
        return feed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = [asdict(t) for t in self.inputs]
        d["outputs"] = [asdict(t) for t in self.outputs]
        d["tolerances"] = {k: asdict(v) for k, v in self.tolerances.items()}
        d["default_dims"] = dict(self.default_dims)
        d["preprocessing"] = dict(self.preprocessing)
        d["labels"] = list(self.labels) if self.labels is not None else None
        d["vocab_sizes"] = dict(self.vocab_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSpec:
        def tensor(t: Mapping) -> TensorSpec:
            vr = t.get("value_range")
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), tuple(vr) if vr else None)

        labels = d.get("labels")
        return cls(
            name=d["name"],
            config=d["config"],
            task=d["task"],
            inputs=tuple(tensor(t) for t in d["inputs"]),
            outputs=tuple(tensor(t) for t in d["outputs"]),
            default_dims=dict(d.get("default_dims", {})),
            tolerances={k: Tolerance(**v) for k, v in d.get("tolerances", {}).items()},
            preprocessing=dict(d.get("preprocessing", {})),
            labels=tuple(labels) if labels is not None else None,
            vocab_sizes=dict(d.get("vocab_sizes", {})),
        )


def image_classifier(
    *, dynamic_size: bool = False, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
):
    """The spec function of an image classifier whose config has img_size, in_chans
    and num_classes (for `register_model(spec=...)`)."""

    def spec_fn(name: str, config_name: str, cfg) -> ModelSpec:
        return image_classification_spec(
            name, config_name, img_size=cfg.img_size, in_chans=cfg.in_chans,
            num_classes=cfg.num_classes, dynamic_size=dynamic_size, mean=mean, std=std,
        )

    return spec_fn


def image_classification_spec(
    name: str,
    config: str,
    *,
    img_size: int,
    in_chans: int,
    num_classes: int,
    dynamic_size: bool,
    tolerances: Mapping[str, Tolerance] | None = None,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> ModelSpec:
    """The spec every image classifier shares: NCHW float images in, logits out.

    `dynamic_size` marks height and width dynamic, for models whose graph does not
    depend on the image size (convolutional trunks with global pooling).
    """
    h, w = ("height", "width") if dynamic_size else (img_size, img_size)
    return ModelSpec(
        name=name,
        config=config,
        task="image-classification",
        inputs=(TensorSpec("images", "float32", ("batch", in_chans, h, w)),),
        outputs=(TensorSpec("logits", "float32", ("batch", num_classes)),),
        default_dims={"height": img_size, "width": img_size} if dynamic_size else {},
        tolerances=dict(tolerances or DEFAULT_TOLERANCES),
        preprocessing=image_preprocessing(img_size, mean, std),
    )


def clip_frames(spec: ModelSpec) -> int:
    """The frames of one clip for a video model: the input's frame axis when fixed, else
    the clip length its preprocessing was trained with."""
    frames = spec.inputs[0].shape[1]
    if isinstance(frames, int):
        return frames
    if "num_frames" not in spec.preprocessing:
        raise ValueError(f"{spec.name} takes clips of any length and names no num_frames to default to")
    return int(spec.preprocessing["num_frames"])


def video_classification_spec(
    name: str,
    config: str,
    *,
    num_frames: int,
    img_size: int,
    in_chans: int,
    num_classes: int,
    tolerances: Mapping[str, Tolerance] | None = None,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    frame_stride: int = 1,
) -> ModelSpec:
    """The spec every video classifier shares: a clip of `num_frames` float frames in,
    (batch, frames, channels, height, width) as Hugging Face's video models take
    `pixel_values`, and logits out.

    The frame count and size are fixed: a model whose position embedding covers the
    whole clip takes no other. `frame_stride` tells clients how many source frames apart
    the clip's frames are taken.
    """
    preprocessing = {**image_preprocessing(img_size, mean, std), "layout": "NTCHW",
                     "num_frames": num_frames, "frame_stride": frame_stride}
    return ModelSpec(
        name=name,
        config=config,
        task="video-classification",
        inputs=(TensorSpec("video", "float32", ("batch", num_frames, in_chans, img_size, img_size)),),
        outputs=(TensorSpec("logits", "float32", ("batch", num_classes)),),
        tolerances=dict(tolerances or DEFAULT_TOLERANCES),
        preprocessing=preprocessing,
    )


def image_captioning_spec(
    name: str,
    config: str,
    *,
    img_size: int,
    vocab_size: int,
    target_len: int,
    in_chans: int = 3,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> ModelSpec:
    """The whole teacher-forced graph every captioner shares: NCHW float images and the
    target caption (starting with <bos>) in, logits per target position out.

    Generation does not use this graph; it runs the encoder and decoder-step parts
    (`export_parts`). This one scores captions and checks the model end to end.
    """
    return ModelSpec(
        name=name,
        config=config,
        task="image-captioning",
        inputs=(TensorSpec("images", "float32", ("batch", in_chans, img_size, img_size)),
                TensorSpec("tgt", "int64", ("batch", target_len), (4, vocab_size))),
        outputs=(TensorSpec("logits", "float32", ("batch", target_len, vocab_size)),),
        tolerances=dict(DEFAULT_TOLERANCES),
        preprocessing=image_preprocessing(img_size, mean, std),
        vocab_sizes={"target": vocab_size},
    )


def image_preprocessing(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """How clients turn an image into the model's input: turn it grey for a one-channel
    model (one mean), resize the short side to `resize`, centre-crop `image_size`, scale
    to [0, 1], normalise per channel."""
    return {"image_size": img_size, "resize": int(round(img_size / 0.875)), "mean": list(mean),
            "std": list(std), "color": "gray" if len(mean) == 1 else "RGB", "layout": "NCHW"}


def source_specs(cfg) -> tuple[TensorSpec, ...]:
    """The source side of a translation model: padded token ids and their lengths."""
    return (TensorSpec("src", "int64", ("batch", "src_len"), (4, cfg.src_vocab)),
            # Lengths from 1 to the example length: padded batches in every example.
            TensorSpec("src_lengths", "int64", ("batch",), (1, cfg.example_src_len + 1)))


def translation_spec(name: str, config_name: str, cfg) -> ModelSpec:
    """The whole teacher-forced graph of a translation model."""
    target = TensorSpec("tgt", "int64", ("batch", cfg.target_len), (4, cfg.tgt_vocab))
    return ModelSpec(
        name=name, config=config_name, task="translation",
        inputs=source_specs(cfg) + (target,),
        outputs=(TensorSpec("logits", "float32", ("batch", cfg.target_len, cfg.tgt_vocab)),),
        default_dims={"src_len": cfg.example_src_len},
        tolerances=dict(DEFAULT_TOLERANCES),
        vocab_sizes={"source": cfg.src_vocab, "target": cfg.tgt_vocab},
    )
