import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Two cores: keep torch and ONNX Runtime from oversubscribing them across a test.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory):
    """Export each registered model's tiny config once per session; name -> result."""
    from attnserve.export import export_onnx

    cache = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name: str):
        if name not in cache:
            cache[name] = export_onnx(name, root / name)
        return cache[name]

    return get
