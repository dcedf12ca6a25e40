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
    from attnserve.models import get_spec

    cache = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name: str, config: str = "tiny"):
        if (name, config) not in cache:
            # Text models get vocabularies of their sizes, saved beside them as users' are.
            sizes = get_spec(name, config).vocab_sizes
            vocabularies = {role: placeholder_vocabulary(n) for role, n in sizes.items()}
            cache[name, config] = export_onnx(name, root / f"{name}-{config}", config=config,
                                              vocabularies=vocabularies)
        return cache[name, config]

    return get


def placeholder_vocabulary(size: int):
    """A word vocabulary of `size` tokens: the specials, then w4, w5, ..."""
    from attnserve.text import SPECIALS, Vocabulary

    return Vocabulary(SPECIALS + tuple(f"w{i}" for i in range(len(SPECIALS), size)))
