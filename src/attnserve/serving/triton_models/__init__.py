"""Model code for Triton's Python backend.

Each module here is copied into a model's version folder as `model.py` by
`build_repository` and runs inside the server's stub process, where
`triton_python_backend_utils` is importable; the server's environment needs attnserve
installed (numpy and onnxruntime, no torch). Shared logic lives in `common`.
"""
