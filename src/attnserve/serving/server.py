"""Start and stop a real Triton Inference Server on a model repository.

The server is the `tritonserver` binary the `nvidia-pytriton` wheel ships, run from the
Python environment it is installed in (the "serving environment": numpy<2, onnxruntime
and attnserve, since python-flavor models import attnserve inside the server). That
environment is found from, in order: the `python=` argument, `$ATTNSERVE_TRITON_PYTHON`,
`.venv-serve/bin/python` in the working directory, or the running interpreter.

Three details make the wheel's binary run outside PyTriton (../shared/DESIGN.md): the
backend directory needs `python/` with the stub for the environment's Python version;
`LD_LIBRARY_PATH` starts with that Python's libdir and the wheel's bundled libraries;
`PATH` starts with the environment's `bin/`, or the stub's embedded Python silently
imports the base interpreter's packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from attnserve.errors import AttnserveError

# The NGC container for native-flavor repositories (Triton 2.71, ONNX Runtime 1.27); the
# same tag as deploy/. The wheel's binary here is 2.51: configs use fields both know.
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-py3"
_PROBE = """
import json, os, sys, sysconfig
import pytriton
root = os.path.dirname(pytriton.__file__)
print(json.dumps({"root": root, "libdir": sysconfig.get_config_var("LIBDIR"),
                  "version": "%d.%d" % sys.version_info[:2], "prefix": sys.prefix}))
"""


# Errors a CPU-only server logs on every start, and the summary that repeats a model's own.
_CPU_NOISE = ("CudaDriverHelper", "CUDA driver", "NVML", "DCGM", "failed to load all models")


class ServerError(AttnserveError):
    """The server did not start, or a model in the repository did not load."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel's server lives in a serving environment."""

    python: Path
    binary: Path
    backends: Path
    stub: Path
    libs: Path
    libdir: str
    bin_dir: Path

    @classmethod
    def find(cls, python: str | Path | None = None) -> TritonInstall:
        python = Path(python or os.environ.get("ATTNSERVE_TRITON_PYTHON") or _default_python())
        if not python.exists():
            raise ServerError(f"no Python at {python}; point ATTNSERVE_TRITON_PYTHON at the serving "
                              "environment's interpreter (`make serve-env` creates .venv-serve)")
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True)
        if probe.returncode != 0:
            raise ServerError(f"{python} has no nvidia-pytriton, which ships the tritonserver binary; "
                              "install it there (pip install 'attnserve[serve]') or run `make serve-env`")
        info = json.loads(probe.stdout.strip().splitlines()[-1])
        server = Path(info["root"]) / "tritonserver"
        stub = server / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        libs = Path(info["root"]).parent / "nvidia_pytriton.libs"
        if not stub.exists():
            raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {info['version']}")
        # Not .resolve(): a venv's python is a symlink, and PATH must name the venv's bin/.
        return cls(python, server / "bin" / "tritonserver", server / "backends", stub, libs, info["libdir"],
                   python.parent)


def _default_python() -> Path:
    local = Path.cwd() / ".venv-serve" / "bin" / "python"
    return local if local.exists() else Path(sys.executable)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def docker_command(repo: str | Path, gpus: bool = True, image: str = NGC_IMAGE) -> str:
    """The `docker run` line that serves a native-flavor repository in the NGC container."""
    repo = Path(repo).resolve()
    gpu = "--gpus all " if gpus else ""
    return (f"docker run --rm {gpu}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {repo}:/models "
            f"{image} tritonserver --model-repository=/models")


class TritonServer:
    """A tritonserver process on `repo`, as a context manager.

        with TritonServer("model_repository") as server:
            client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Ports not given are picked free; the server binds to `host` (localhost unless told
    otherwise) and writes its log to `log_file` (a temporary file if not given).
    `start()` returns once the server answers and every model has loaded or failed;
    models that failed are in `failed` (name -> Triton's reason), and with
    `strict=True` a failure stops the server and raises ServerError.
    """

    def __init__(self, repo: str | Path, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 log_file: str | Path | None = None, python: str | Path | None = None,
                 timeout_s: float = 180.0, strict: bool = False, log_verbose: int = 0):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServerError(f"{repo} is not a directory; build one with `attnserve repo build`")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_file = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver-",
                                                                              suffix=".log")[1])
        self.python = python
        self.timeout_s = timeout_s
        self.strict = strict
        self.log_verbose = log_verbose
        self.failed: dict[str, str] = {}
        self.models: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._backends: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        return [str(install.binary), f"--model-repository={self.repo}", f"--backend-directory={backends}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--exit-on-error=false", "--exit-timeout-secs=10", f"--log-verbose={self.log_verbose}"]

    def start(self) -> TritonServer:
        install = TritonInstall.find(self.python)
        self._backends = Path(tempfile.mkdtemp(prefix="attnserve-backends-"))
        python_backend = self._backends / "python"
        python_backend.mkdir()
        for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
            os.symlink(install.backends / "python" / f, python_backend / f)
        shutil.copy2(install.stub, python_backend / "triton_python_backend_stub")
        env = dict(os.environ)
        env["PATH"] = f"{install.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (install.libdir, str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
        env.pop("PYTHONPATH", None)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self._process = subprocess.Popen(self.command(install, self._backends), stdout=log,
                                             stderr=subprocess.STDOUT, env=env, preexec_fn=_detach)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, method: str = "GET", body: bytes | None = None, timeout_s: float = 5.0):
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self._process.returncode}: "
                                  f"{self.log_error() or 'see ' + str(self.log_file)}")
            try:
                # Short waits: a port held by another program accepts and never answers.
                wait = min(2.0, max(0.1, deadline - time.monotonic()))
                if self._get("/v2/health/live", timeout_s=wait)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver did not answer within {self.timeout_s:.0f} s "
                                  f"(log: {self.log_file})")
            time.sleep(0.2)
        # Models load before the endpoints open; the index says which failed and why.
        _, body = self._get("/v2/repository/index", "POST", b"{}")
        index = json.loads(body)
        self.models = {m["name"]: m.get("state", "") for m in index}
        self.failed = {m["name"]: _first_sentence(m.get("reason", "") or "unknown reason")
                       for m in index if m.get("state") != "READY"}
        if self.failed and self.strict:
            raise ServerError(self.describe_failures())

    def describe_failures(self) -> str:
        return "; ".join(f"model {name} did not load: {reason}"
                         for name, reason in sorted(self.failed.items()))

    def log_error(self) -> str | None:
        """The server's last error line that is not CPU-only noise, without its prefix."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return None
        errors = [m.group(1).strip().strip('"').strip() for m in
                  (re.match(r"^E\d{4} [\d:.]+ \d+ \S+\] (.*)$", line) for line in text.splitlines()) if m]
        errors = [e for e in errors if not any(noise in e for noise in _CPU_NOISE)]
        return _first_sentence(errors[-1]) if errors else None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._process = None
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _detach() -> None:
    """In the child: a session of its own (so a terminal's Ctrl-C reaches only us, and we
    stop the server in order), and SIGTERM when its parent dies (so a killed parent
    leaves no orphan server holding the ports). Linux sends it when the thread that
    started the server exits: start servers from a thread that outlives them."""
    os.setsid()
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _first_sentence(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= 400 else reason[:400] + "..."
