"""Serving on Triton Inference Server: model repositories written from exports."""

from attnserve.serving.repository import FLAVORS, ServingPolicy, build_repository, model_config

__all__ = ["FLAVORS", "ServingPolicy", "build_repository", "model_config"]
