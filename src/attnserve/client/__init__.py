"""The client SDK: what an application imports to use attnserve models on Triton.

Needs numpy, opencv and tritonclient; no torch.

    from attnserve.client import Client
    with Client("localhost:8001") as client:
        print(client.classify("vit-s16", "cat.jpg", top_k=3))
        print(client.caption("vit_captioner-base", "cat.jpg", beam_width=3).text)
        for window in client.stream_actions("vivit-base", "clip.mp4"):
            print(window.start, window.predictions[0].label)
"""

from attnserve.client._core import ClientError, ModelInfo
from attnserve.client.aio import AsyncClient
from attnserve.client.media import iter_frames, load_image, sliding_clips
from attnserve.client.results import ActionWindow, Detection, Generated, Prediction
from attnserve.client.sync import Client

__all__ = ["ActionWindow", "AsyncClient", "Client", "ClientError", "Detection", "Generated", "ModelInfo",
           "Prediction", "iter_frames", "load_image", "sliding_clips"]
