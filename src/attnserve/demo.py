"""`attnserve demo` (`make demo`): the whole product on models that learned something.

1. train the demo tasks' models here, or reuse their checkpoints (attnserve.train);
2. export each checkpoint to ONNX with the parity check, its class names or vocabulary
   beside it, as a user exports theirs;
3. write a Triton model repository (python flavor: the pip-installed server) and start
   tritonserver on localhost;
4. call it with the client SDK on held-out inputs written to disk: digits (stn, ram),
   pictures of shapes to caption (show_attend_tell, vit_captioner) and one video file of
   several actions (vivit, nonlocal_i3d); print what comes back against the truth;
5. time one request per model on the eager model, ONNX Runtime in process and Triton,
   side by side;
6. write the attention pictures and a summary.json, and stop the server.

Everything lands under one folder (out/demo by default); a second run reuses the
checkpoints and the exports whose checkpoint has not changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnserve.train import TASKS, TrainResult, task_module, train_task

Say = Callable[[str], None]
LATENCY_WARMUP = 3
LATENCY_CALLS = 15


@dataclass
class DemoModel:
    """One trained model on its way through the product."""

    task: str
    trained: TrainResult
    export_dir: Path | None = None
    served_score: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Its export's folder and its name in the repository."""
        return f"{self.trained.model}-{self.trained.config}"


@dataclass
class DemoLayout:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def pictures(self) -> Path:
        return self.root / "pictures"

    @property
    def server_log(self) -> Path:
        return self.root / "tritonserver.log"


def run_demo(root: str | Path = "out/demo", *, seed: int = 0, say: Say = print,
             section: Say | None = None, python: str | None = None) -> dict:
    """Run every step; returns the summary also written to `root`/summary.json."""
    section = section or (lambda title: say(f"== {title}"))
    layout = DemoLayout(Path(root))
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(step: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timings[step] = time.perf_counter() - t0
        return out

    section("1. train the demo models (or reuse their checkpoints)")
    models = timed("train", _train, layout, seed, say)
    section("2. export each checkpoint to ONNX, with parity against the eager model")
    timed("export", _export, layout, models, say)
    section("3. a Triton model repository, served on localhost")
    from attnserve.serving import ServingPolicy, TritonServer, build_repository

    repo = timed("repository", build_repository, [m.export_dir for m in models], layout.repo, "python",
                 ServingPolicy(max_batch_size=8, preferred_batch_sizes=(4, 8)), [m.name for m in models])
    t0 = time.perf_counter()
    with TritonServer(repo, log_file=layout.server_log, python=python, strict=True) as server:
        timings["server start"] = time.perf_counter() - t0
        say(f"tritonserver on {server.grpc_url} (gRPC), {server.http_url} (HTTP); log {layout.server_log}")
        section("4. the client on held-out inputs")
        timed("client", _call_models, layout, models, server.grpc_url, seed, say)
        section("5. latency of one request, batch 1: eager vs ONNX Runtime vs Triton (median ms)")
        timed("latency", _latency, models, server.grpc_url, say)
    timings["total"] = time.perf_counter() - started
    summary = {
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "models": [{
            "task": m.task, "model": m.trained.model, "config": m.trained.config,
            "checkpoint": str(m.trained.checkpoint), "export": str(m.export_dir), "served_as": m.name,
            "held_out": m.trained.metrics, "served": m.served_score, "latency_ms": m.latency_ms,
            "train_seconds": round(m.trained.seconds, 1),
        } for m in models],
    }
    (layout.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    section("6. where everything is")
    say(f"checkpoints {layout.checkpoints}  exports {layout.exports}  repository {layout.repo}")
    say(f"inputs {layout.inputs}  pictures {layout.pictures}  summary {layout.root / 'summary.json'}")
    say(f"demo took {timings['total'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')})")
    return summary


# ---------------------------------------------------------------- 1. train


def _train(layout: DemoLayout, seed: int, say: Say) -> list[DemoModel]:
    models = []
    for task in TASKS:
        started = time.time()
        results = train_task(task, layout.checkpoints, seed=seed, reuse=True, on_progress=None)
        for r in results:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items() if isinstance(v, float))
            reused = r.checkpoint.stat().st_mtime < started  # written before this run
            how = "reused" if reused else f"trained in {r.seconds:.0f} s"
            say(f"  {task}: {r.model} ({r.config}) {how}; held-out {metrics}")
            models.append(DemoModel(task, r))
    return models


# ---------------------------------------------------------------- 2. export


def _export(layout: DemoLayout, models: list[DemoModel], say: Say) -> None:
    from attnserve.export import export_onnx

    for m in models:
        r = m.trained
        out = layout.exports / m.name
        m.export_dir = out
        if _export_is_current(out, r.checkpoint):
            say(f"  {m.name}: export up to date ({out})")
            continue
        vocab = r.extra.get("vocabulary")
        role = r.extra.get("vocabulary_role", "target")
        vocabularies = {role: layout.checkpoints / vocab} if vocab else None
        t0 = time.perf_counter()
        result = export_onnx(r.model, out, config=r.config, checkpoint=r.checkpoint,
                             labels=r.extra.get("labels"), vocabularies=vocabularies)
        worst = max((o.max_abs_error for rep in result.parity for o in rep.outputs), default=0.0)
        say(f"  {m.name}: parity passed at batch 1 and 3 (max abs error {worst:.1e}), "
            f"{time.perf_counter() - t0:.0f} s -> {out}")


def _export_is_current(out: Path, checkpoint: Path) -> bool:
    manifest, parity = out / "attnserve.json", out / "parity.json"
    if not (manifest.is_file() and parity.is_file()):
        return False
    recorded = json.loads(manifest.read_text()).get("checkpoint")
    return (recorded == str(checkpoint.resolve()) and json.loads(parity.read_text()).get("passed")
            and parity.stat().st_mtime >= checkpoint.stat().st_mtime)


# ---------------------------------------------------------------- 4. client


def _call_models(layout: DemoLayout, models: list[DemoModel], url: str, seed: int, say: Say) -> None:
    from attnserve.client import Client

    layout.pictures.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[DemoModel]] = {}
    for m in models:
        by_task.setdefault(m.task, []).append(m)
    with Client(url, timeout_s=120) as client:
        for task, group in by_task.items():
            CALLERS[task](client, layout, group, seed, say)


def _digits(client, layout: DemoLayout, models: list[DemoModel], seed: int, say: Say) -> None:
    from attnserve.client import visualize

    samples = task_module("digits").write_samples(layout.inputs / "digits", n=48, seed=seed)
    say(f"  {len(samples)} held-out cluttered digits in {layout.inputs / 'digits'}")
    for m in models:
        predicted = [client.classify(m.name, path, top_k=1)[0].label for path, _ in samples]
        right = sum(p == truth for p, (_, truth) in zip(predicted, samples, strict=True))
        m.served_score = {"accuracy": right / len(samples)}
        pairs = list(zip(predicted, samples, strict=True))[:12]
        shown = "  ".join(f"{truth}->{p}" for p, (_, truth) in pairs)
        say(f"  {m.name}: {right}/{len(samples)} right through Triton ({right / len(samples):.0%}); "
            f"truth->answer: {shown}")
        if m.trained.model == "ram":
            path = layout.pictures / f"{m.name}-glimpses.png"
            visualize.save_png(_glimpse_sheet(client, m.name, [p for p, _ in samples[:8]]), path)
            say(f"  {m.name}: where it looked -> {path}")


def _glimpse_sheet(client, model: str, paths: list[Path]) -> np.ndarray:
    """The canvases with RAM's glimpses drawn in order (first bright, later darker)."""
    import cv2

    from attnserve.client import load_image
    from attnserve.client._core import pixels
    from attnserve.postprocess_ram import glimpse_boxes

    spec = client.model_info(model).require_spec()
    patch = int(spec.preprocessing.get("patch_size", 8))
    panels = []
    for path in paths:
        rgb = load_image(path)  # the grey canvas, as RGB; the spec turns it grey again
        out = client.infer(model, {spec.input_names[0]: pixels(spec, [rgb])}, ["locations"])["locations"][0]
        size, scale = rgb.shape[0], 4
        panel = cv2.resize(rgb, (size * scale, size * scale), interpolation=cv2.INTER_NEAREST)
        boxes = glimpse_boxes(out, (size, size), patch, num_scales=1)[:, 0] * scale  # (N, 4), finest patch
        for t, (x0, y0, x1, y1) in enumerate(boxes):
            shade = int(255 * (1 - t / max(len(boxes), 1)))
            cv2.rectangle(panel, (int(x0), int(y0)), (int(x1), int(y1)), (255, shade, 0), 1)
        panels.append(panel)
    return np.concatenate(panels, axis=1)


def _captions(client, layout: DemoLayout, models: list[DemoModel], seed: int, say: Say) -> None:
    from attnserve.client import load_image, visualize

    samples = task_module("captions").write_samples(layout.inputs / "shapes", n=8, seed=seed)
    say(f"  {len(samples)} held-out pictures of shapes in {layout.inputs / 'shapes'}")
    for m in models:
        exact = 0
        for i, (path, truth) in enumerate(samples):
            caption = client.caption(m.name, path)
            exact += caption.text == truth
            if i < 4:
                mark = "=" if caption.text == truth else "!"
                say(f"  {m.name}: {path.name}: {caption.text!r} {mark} {truth!r}")
            if i < 2 and caption.attention is not None:
                picture = layout.pictures / f"{m.name}-{path.stem}-attention.png"
                visualize.save_png(visualize.caption_attention(load_image(path), caption), picture)
        m.served_score = {"exact_match": exact / len(samples)}
        say(f"  {m.name}: {exact}/{len(samples)} captions exactly right through Triton; "
            f"attention per word -> {layout.pictures / (m.name + '-*-attention.png')}")


def _actions(client, layout: DemoLayout, models: list[DemoModel], seed: int, say: Say) -> None:
    from attnserve.client import visualize

    actions = task_module("actions")
    video, segments = actions.write_video(layout.inputs / "actions.mp4", seed=seed)
    say(f"  {video}: {len(segments)} actions, " + ", ".join(f"{s}-{e} {a}" for s, e, a in segments))
    for m in models:
        windows = client.recognize_actions(m.name, video, top_k=1)
        right = 0
        found = []
        for w in windows:
            truth = actions.label_of(segments, w.start, w.end)
            said = w.predictions[0].label
            right += said == truth
            found.append(f"{w.start}-{w.end} {said}" + ("" if said == truth else f" (was {truth})"))
        m.served_score = {"clip_accuracy": right / max(len(windows), 1)}
        picture = layout.pictures / f"{m.name}-timeline.png"
        visualize.save_png(visualize.action_timeline(windows), picture)
        say(f"  {m.name}: {right}/{len(windows)} clips right through Triton; {'; '.join(found)}")
        say(f"  {m.name}: timeline -> {picture}")


CALLERS = {"digits": _digits, "captions": _captions, "actions": _actions}


# ---------------------------------------------------------------- 5. latency


def _latency(models: list[DemoModel], url: str, say: Say) -> None:
    """One request of batch 1 per call, the same input everywhere: the model's forward for
    classifiers; a whole greedy caption for captioners (encoder once, then one decoder step
    per token, in process or in the server)."""
    from rich.console import Console
    from rich.table import Table

    from attnserve.bench.latency import median_ms
    from attnserve.client import Client

    table = Table("model", "eager", "ONNX Runtime", "Triton (gRPC)", "ORT / eager", "Triton / ORT")
    with Client(url, timeout_s=120) as client:
        for m in models:
            with ExitStack() as runners:
                m.latency_ms = {backend: median_ms(call, LATENCY_CALLS, LATENCY_WARMUP)
                                for backend, call in _calls(m, client, runners).items()}
            e, o, t = (m.latency_ms[b] for b in ("torch", "ort", "triton"))
            table.add_row(m.name, f"{e:.2f}", f"{o:.2f}", f"{t:.2f}", f"{o / e:.2f}x", f"{t / o:.2f}x")
    console = Console(record=True, width=120)
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().rstrip().splitlines():
        say(line)


def _calls(m: DemoModel, client, runners: ExitStack) -> dict[str, Callable[[], object]]:
    """backend -> a call that runs one request of `m` at batch 1, the same input for all;
    the in-process runners are closed with `runners`."""
    from attnserve import runtime
    from attnserve.client._core import generation_inputs

    if m.task == "captions":
        served = f"{m.name}-generate"
        spec = client.model_info(served).require_spec()
        name = spec.input_names[0]
        image = spec.example_inputs(1, seed=0)[name]
        calls = {backend: _greedy_caller(m.export_dir, backend, name, image, runners)
                 for backend in ("torch", "ort")}
        request = generation_inputs({name: image}, 1, None)
        calls["triton"] = lambda: client.infer(served, request)
        return calls
    spec = client.model_info(m.name).require_spec()
    feed = spec.example_inputs(1, seed=0)
    calls = {backend: runners.enter_context(runtime.load(m.export_dir, backend=backend)).run
             for backend in ("torch", "ort")}
    return {backend: (lambda run=run: run(feed)) for backend, run in calls.items()} | {
        "triton": lambda: client.infer(m.name, feed)}


def _greedy_caller(export_dir: Path, backend: str, image_input: str, image: np.ndarray, runners: ExitStack):
    from attnserve import runtime
    from attnserve.runtime.generate import greedy_search

    encoder, step, config = runtime.load_generator(export_dir, backend=backend)
    runners.enter_context(encoder)
    runners.enter_context(step)
    return lambda: greedy_search(encoder, step, {image_input: image}, config)

