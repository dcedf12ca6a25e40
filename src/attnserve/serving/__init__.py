"""Serving on Triton Inference Server: model repositories written from exports, and a
launcher for a real tritonserver process."""

from attnserve.serving.repository import FLAVORS, ServingPolicy, build_repository, model_config
from attnserve.serving.server import NGC_IMAGE, ServerError, TritonServer, docker_command

__all__ = ["FLAVORS", "NGC_IMAGE", "ServerError", "ServingPolicy", "TritonServer", "build_repository",
           "docker_command", "model_config"]
