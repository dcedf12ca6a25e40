"""The model zoo. Importing this package registers every architecture family."""

from attnserve.models import (  # noqa: F401  (registers)
    attention_lstm_action,
    attention_resnet,
    attention_to_scale,
    cait,
    deit,
    detr,
    draw,
    gan,
    han,
    handwriting,
    image_transformer,
    nonlocal_net,
    pdan,
    pvt,
    ram,
    recurrent_saliency,
    sasa,
    semantic_attention,
    separable_sta,
    seq2seq,
    show_attend_tell,
    stacked_attention_vqa,
    stn,
    swin,
    transformer,
    vit,
    vit_captioner,
    vivit,
)
from attnserve.models.registry import (
    ModelEntry,
    create_model,
    get_entry,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelEntry", "create_model", "get_entry", "get_spec", "list_models", "register_model"]
