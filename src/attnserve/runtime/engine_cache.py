"""The engine cache: a TensorRT engine and the JSON sidecar that says what it was built for.

    <dir>/model.engine        the serialized engine (TensorRT's "plan")
    <dir>/model.engine.json   its sidecar: TensorRT version, GPU name and compute
                              capability, precision, optimisation profiles, the sha256 of
                              the ONNX file and its external data, plugin versions, and
                              the I/O spec (named dynamic axes) the runner validates with

A plan runs only on the TensorRT version that built it, and NVIDIA advises against
using it on another GPU model (kernels are chosen by timing on the building GPU). The
sidecar makes that checkable before deserialising: `sidecar_problems` compares what was
recorded with the current machine and request and names every difference, and
`load_engine` rebuilds or refuses on that list.

Plain Python (hashlib, json) up to `load_engine`, which alone reaches TensorRT and CUDA
(through attnserve.runtime.tensorrt, imported when called): every comparison is tested
on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from attnserve.artifact import ONNX_NAME
from attnserve.errors import AttnserveError

SIDECAR_FORMAT = 1
_CHUNK = 1 << 20

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]  # (min, opt, max) of one input


class EngineMismatchError(AttnserveError):
    """An engine built for another TensorRT, GPU, model, precision, profile or plugin set."""


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


@dataclass(frozen=True)
class Environment:
    """What the current machine offers; None where it was not (or could not be) probed,
    and then it is not compared.

    Attributes:
        tensorrt: `tensorrt.__version__`.
        gpu_name: the device name CUDA reports ("NVIDIA A100-SXM4-40GB").
        compute_capability: "major.minor" ("8.0").
        plugins: "namespace::name" -> plugin version, of the plugin creators registered.
    """

    tensorrt: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    plugins: Mapping[str, str] | None = None


# ---- the ONNX model's files and their hashes -------------------------------------------------

def onnx_files(onnx_path: str | Path) -> list[Path]:
    """The ONNX file and the external-data files its tensors name (those that exist).

    With the onnx package the graph's own record is read (without the weights); without
    it, the exporter's convention `<name>.data` is assumed.
    """
    onnx_path = Path(onnx_path)
    names: list[str] = []
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        names = sorted(_external_locations(model.graph, onnx.TensorProto.EXTERNAL, onnx.AttributeProto))
    except ImportError:
        names = [onnx_path.name + ".data"]
    except Exception:  # not readable as ONNX: hash what is there; the parser will say what is wrong
        names = [onnx_path.name + ".data"]
    extra = [onnx_path.parent / n for n in names if n != onnx_path.name]
    return [onnx_path] + [p for p in extra if p.is_file()]


def _external_locations(graph, external: int, attr_proto) -> set[str]:
    """Locations of external tensors in a graph and its subgraphs (If/Loop bodies)."""
    found: set[str] = set()

    def tensors(g):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == attr_proto.TENSOR:
                    yield a.t
                elif a.type == attr_proto.TENSORS:
                    yield from a.tensors
                elif a.type == attr_proto.GRAPH:
                    yield from tensors(a.g)
                elif a.type == attr_proto.GRAPHS:
                    for sub in a.graphs:
                        yield from tensors(sub)

    for t in tensors(graph):
        if t.data_location == external:
            found.update(e.value for e in t.external_data if e.key == "location")
    return found


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(files: Sequence[Path], previous: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """name -> {sha256, size, mtime_ns} for each file.

    A file whose size and modification time equal `previous`'s keeps the recorded hash
    without being read again (as make decides what is stale), so checking a
    gigabyte-sized model on every load costs a stat, not a read.
    """
    out = {}
    for path in files:
        st = path.stat()
        old = (previous or {}).get(path.name)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = old["sha256"]
        else:
            digest = file_sha256(path)
        out[path.name] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def current_fingerprint(onnx_path: str | Path, recorded: Mapping[str, Mapping]) -> dict[str, dict]:
    """The fingerprint, now, of the files an engine was built from (those still there)
    plus `onnx_path` itself; reads no ONNX (a runner imports no onnx package)."""
    onnx_path = Path(onnx_path)
    names = sorted(set(recorded) | {onnx_path.name})
    files = [onnx_path.parent / n for n in names]
    return fingerprint([p for p in files if p.is_file()], recorded)


# ---- profiles in JSON ----------------------------------------------------------------------------

def profiles_to_json(profiles: Mapping[str, Profile]) -> dict:
    return {name: {"min": list(p[0]), "opt": list(p[1]), "max": list(p[2])} for name, p in profiles.items()}


def profiles_from_json(d: Mapping) -> dict[str, Profile]:
    return {name: (tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for name, p in d.items()}


def describe_profile(p: Profile) -> str:
    return "min {} opt {} max {}".format(*("x".join(str(d) for d in s) for s in p))


# ---- the sidecar ---------------------------------------------------------------------------------

def make_sidecar(
    *,
    engine: Path,
    onnx_path: Path,
    env: Environment,
    precision: str,
    profiles: Mapping[str, Profile],
    plugins: Mapping[str, str],
    plugin_sources: Sequence[str] = (),
    io: Mapping | None = None,
    build: Mapping | None = None,
    previous_files: Mapping[str, Mapping] | None = None,
) -> dict:
    """The sidecar of an engine just built (plain data, written as JSON)."""
    from attnserve import __version__

    try:  # relative where possible: an export directory moves as a whole
        onnx_ref = os.path.relpath(onnx_path, engine.parent)
    except ValueError:  # another drive (Windows)
        onnx_ref = str(onnx_path)
    return {
        "format": SIDECAR_FORMAT,
        "engine": engine.name,
        "tensorrt": env.tensorrt,
        "gpu": {"name": env.gpu_name, "compute_capability": env.compute_capability},
        "precision": precision,
        "profiles": profiles_to_json(profiles),
        "onnx": {"path": onnx_ref, "files": fingerprint(onnx_files(onnx_path), previous_files)},
        "plugins": dict(sorted(plugins.items())),
        "plugin_sources": list(plugin_sources),
        "io": dict(io or {}),
        "build": dict(build or {}),
        "attnserve": __version__,
    }


def write_sidecar(engine: str | Path, sidecar: Mapping) -> Path:
    path = sidecar_path(engine)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(engine: str | Path) -> dict:
    """The sidecar of `engine`; EngineMismatchError when it is missing or unreadable."""
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineMismatchError(f"{engine} has no sidecar {path.name}, so what it was built for is unknown")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineMismatchError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EngineMismatchError(
            f"{path} has sidecar format {found!r}; this attnserve reads format {SIDECAR_FORMAT}"
        )
    return data


def recorded_onnx(engine: str | Path, sidecar: Mapping) -> Path | None:
    """The ONNX file the engine was built from, resolved from beside the engine."""
    ref = (sidecar.get("onnx") or {}).get("path")
    if not ref:
        return None
    path = Path(ref)
    return path if path.is_absolute() else (Path(engine).parent / path).resolve()


def sidecar_problems(
    recorded: Mapping,
    env: Environment,
    *,
    onnx: Mapping[str, Mapping] | None = None,
    precision: str | None = None,
    profiles: Mapping[str, Profile] | None = None,
) -> list[str]:
    """Every way the recorded build differs from what is here and what is asked for.

    Args:
        recorded: the sidecar.
        env: this machine (fields that are None are not compared).
        onnx: the current fingerprint of the ONNX files (`fingerprint`), or None when
            the ONNX model is not here (an engine deployed on its own).
        precision, profiles: what the caller asks for (profiles: only the inputs named
            are compared); None accepts what was built.

    Returns:
        One phrase per difference, each naming what was recorded and what is here.
    """
    problems = []
    built_trt = recorded.get("tensorrt")
    if env.tensorrt is not None and built_trt != env.tensorrt:
        problems.append(f"it was built with TensorRT {built_trt}, this machine has TensorRT {env.tensorrt}")
    gpu = recorded.get("gpu") or {}
    built_cc, built_name = gpu.get("compute_capability"), gpu.get("name")
    if env.compute_capability is not None and built_cc != env.compute_capability:
        problems.append(
            f"it was built for compute capability {built_cc} ({built_name}), this GPU is "
            f"{env.compute_capability} ({env.gpu_name})"
        )
    elif env.gpu_name is not None and built_name != env.gpu_name:
        problems.append(f"it was built on a {built_name}, this GPU is a {env.gpu_name} "
                        "(TensorRT picks kernels by timing them on the building GPU)")
    if precision is not None and recorded.get("precision") != precision:
        problems.append(f"it was built at precision {recorded.get('precision')}, {precision} was asked for")
    if profiles is not None:
        built = profiles_from_json(recorded.get("profiles") or {})
        for name in sorted(profiles):
            if name not in built:
                problems.append(f"it has no profile for input {name}")
            elif tuple(map(tuple, built[name])) != tuple(map(tuple, profiles[name])):
                problems.append(f"its profile for {name} is {describe_profile(built[name])}, "
                                f"asked for {describe_profile(profiles[name])}")
    if onnx is not None:
        problems += _onnx_problems((recorded.get("onnx") or {}).get("files") or {}, onnx)
    if env.plugins is not None:
        for key, version in sorted((recorded.get("plugins") or {}).items()):
            here = env.plugins.get(key)
            if here is None:
                problems.append(f"it uses plugin {key} (version {version}), which is not registered here")
            elif here != version:
                problems.append(f"it uses plugin {key} version {version}, this machine has version {here}")
    return problems


def _onnx_problems(built: Mapping[str, Mapping], now: Mapping[str, Mapping]) -> list[str]:
    problems = []
    for name in sorted(set(built) | set(now)):
        if name not in now:
            problems.append(f"{name}, which it was built from, is missing")
        elif name not in built:
            problems.append(f"the ONNX model now has {name}, which it was not built from")
        elif built[name].get("sha256") != now[name].get("sha256"):
            then, here = built[name].get("sha256", "?")[:12], now[name]["sha256"][:12]
            problems.append(f"{name} changed since it was built (sha256 {then} then, {here} now)")
    return problems


# ---- loading through the cache -----------------------------------------------------------------

@dataclass(frozen=True)
class LoadedEngine:
    path: Path
    data: bytes
    sidecar: dict
    rebuilt: bool


def load_engine(
    engine_path: str | Path,
    onnx_path: str | Path | None = None,
    *,
    rebuild: bool = True,
    precision: str | None = None,
    profiles: Mapping[str, Sequence[Sequence[int]]] | None = None,
    device: int = 0,
    **build_options,
) -> LoadedEngine:
    """An engine's bytes, once its sidecar matches this machine and the request.

    The sidecar is compared with TensorRT's version, the GPU (name and compute
    capability), the plugins registered (the engine's plugin sets are registered first,
    as deserialising needs them), the ONNX files' hashes (when the ONNX model is here),
    and the precision and profiles asked for (None: whatever was built). On any
    difference, or a missing engine, it is rebuilt when `rebuild` and the ONNX model is
    here (`onnx_path`, else the path the sidecar records); otherwise EngineMismatchError
    names every difference.

    build_options go to `build_engine` on a rebuild (workspace, timing_cache, policy, ...).
    """
    from attnserve.runtime import tensorrt as t  # the TensorRT side (lazy: it imports this module)

    engine_path = Path(engine_path)
    trt = t.import_tensorrt()
    gpu = t.gpu_info(t.import_cudart(), device)
    sidecar: dict | None = None
    if not engine_path.is_file():
        problems = [f"{engine_path} does not exist"]
    else:
        try:
            sidecar = read_sidecar(engine_path)
            problems = []
        except EngineMismatchError as e:
            problems = [str(e)]
    onnx = Path(onnx_path) if onnx_path is not None else (
        recorded_onnx(engine_path, sidecar) if sidecar else None)
    if onnx is not None and onnx.is_dir():
        onnx = onnx / ONNX_NAME
    try:
        wanted = {k: t.as_profile(v) for k, v in (profiles or {}).items()}
    except (TypeError, ValueError):
        raise t.ProfileError(f"profiles map input names to three shapes (min, opt, max), "
                             f"got {profiles!r}") from None
    if sidecar is not None:
        versions: dict[str, str] = {}
        for source in sidecar.get("plugin_sources") or []:
            try:
                versions.update(t.register_plugins(trt, [source])[0])
            except t.PluginError as e:
                problems.append(str(e))
        env = Environment(trt.__version__, gpu.name, gpu.compute_capability, versions)
        files = (sidecar.get("onnx") or {}).get("files") or {}
        current = current_fingerprint(onnx, files) if onnx is not None and onnx.is_file() else None
        problems += sidecar_problems(sidecar, env, onnx=current, precision=precision,
                                     profiles=wanted or None)
    if cache_decision(engine_path, problems, onnx, rebuild) == "use":
        return LoadedEngine(engine_path, engine_path.read_bytes(), sidecar, False)
    spec = build_options.pop("spec", None) or t.model_spec_for(onnx)[0]
    recorded = profiles_from_json((sidecar or {}).get("profiles") or {})
    keep = {k: v for k, v in recorded.items() if k in spec.input_names}
    plugins = [*((sidecar or {}).get("plugin_sources") or ()), *build_options.pop("plugins", ())]
    t.build_engine(onnx, engine_path, profiles={**keep, **wanted},
                   precision=precision or (sidecar or {}).get("precision") or "fp32",
                   plugins=list(dict.fromkeys(plugins)), device=device, spec=spec, **build_options)
    return LoadedEngine(engine_path, engine_path.read_bytes(), read_sidecar(engine_path), True)


def cache_decision(engine_path: Path, problems: Sequence[str], onnx: Path | None, rebuild: bool) -> str:
    """"use" the engine, "rebuild" it from `onnx`, or raise EngineMismatchError naming
    every problem and what to do."""
    if not problems:
        return "use"
    if rebuild and onnx is not None and onnx.is_file():
        return "rebuild"
    if onnx is None:
        todo = "rebuild it with `attnserve build-engine` from the ONNX model it came from"
    elif not onnx.is_file():
        todo = f"rebuild it from its ONNX model ({onnx} is not here)"
    else:
        todo = f"rebuild it (`attnserve build-engine {onnx} -o {engine_path}`) or allow rebuilding"
    raise EngineMismatchError(f"{engine_path} cannot be used here: " + "; ".join(problems)
                              + f". To fix: {todo}")
