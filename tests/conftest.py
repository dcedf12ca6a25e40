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
    """Export each registered model's config (tiny by default) once per session;
    (name, config) -> result."""
    from attnserve.export import export_onnx

    cache = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name: str, config: str = "tiny"):
        if (name, config) not in cache:
            cache[name, config] = export_onnx(name, root / f"{name}-{config}", config=config)
        return cache[name, config]

    return get
