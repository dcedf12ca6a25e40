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
    """Export each registered model's config (tiny by default) once per test run, shared
    by the xdist workers through a directory and a lock (exports are most of the suite's
    time); (name, config) -> result."""
    import pickle

    from filelock import FileLock

    from attnserve.export import export_onnx
    from attnserve.models import get_spec

    cache = {}
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base is <run>/popen-gwN: their parent is this run's alone.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-exports"
    root.mkdir(exist_ok=True)

    def get(name: str, config: str = "tiny"):
        if (name, config) not in cache:
            out = root / f"{name}-{config}"
            saved = root / f"{name}-{config}.result.pkl"  # our own object, written just below
            with FileLock(str(out) + ".lock"):
                if saved.exists():
                    cache[name, config] = pickle.loads(saved.read_bytes())
                else:
                    # Text models get vocabularies of their sizes, saved beside them as users' are.
                    sizes = get_spec(name, config).vocab_sizes
                    vocabularies = {role: placeholder_vocabulary(n) for role, n in sizes.items()}
                    result = export_onnx(name, out, config=config, vocabularies=vocabularies)
                    saved.write_bytes(pickle.dumps(result))
                    cache[name, config] = result
        return cache[name, config]

    return get


def placeholder_vocabulary(size: int):
    """A word vocabulary of `size` tokens: the specials, then w4, w5, ..."""
    from attnserve.text import SPECIALS, Vocabulary

    return Vocabulary(SPECIALS + tuple(f"w{i}" for i in range(len(SPECIALS), size)))


# The models the real-server tests serve (python flavor): classifiers (swin with the
# WindowAttention custom op, vivit a video model), a captioner, a translator, a
# class-conditional generator and a detector.
SERVED = ["vit", "swin", "vivit", "vit_captioner", "bahdanau_seq2seq", "sagan", "detr"]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


def add_broken_model(folder: Path, name: str = "broken") -> None:
    """A Python-backend model whose code fails on import."""
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text("raise ImportError('this model is broken on purpose')\n")
    (folder / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
                                         'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                                         'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')


@pytest.fixture(scope="session")
def served_exports(exported_tiny):
    return {name: exported_tiny(name) for name in SERVED}


@pytest.fixture(scope="session")
def triton_server(served_exports, tmp_path_factory):
    """One real tritonserver per test session (per xdist worker) on the SERVED models and
    a model that fails to load."""
    if not SERVE_PYTHON.exists():
        pytest.skip("no .venv-serve: run `make serve-env`")
    from attnserve.serving import TritonServer, build_repository

    root = tmp_path_factory.mktemp("serving")
    repo = build_repository([r.out_dir for r in served_exports.values()], root / "repo", flavor="python")
    add_broken_model(repo / "broken")
    with TritonServer(repo, log_file=root / "tritonserver.log", python=SERVE_PYTHON) as server:
        yield server


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny training batches run faster on one thread: with two threads per xdist worker on
    two busy cores, the short trainings of the train tests took up to 20 times longer
    (threads waiting on each other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
