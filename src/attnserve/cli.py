"""The `attnserve` command line.

Every error a user can cause (an unknown model, a checkpoint that does not fit, a
model that fails parity) is an AttnserveError: it is printed as one sentence on stderr
and the exit code is 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from attnserve.errors import AttnserveError

app = typer.Typer(
    name="attnserve",
    help="Attention models from PyTorch to production: export, verify, benchmark, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AttnserveError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise AttnserveError(f"{what} must be positive whole numbers, got {text!r}")
    return values


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered models with their configs and checkpoint formats."""
    from attnserve.models import get_entry, list_models

    entries = [get_entry(n) for n in list_models()]
    if as_json:
        print(json.dumps([
            {"name": e.name, "task": e.task, "configs": list(e.configs), "paper": e.paper,
             "checkpoint_formats": list(e.checkpoint_formats), "custom_ops": list(e.custom_ops)}
            for e in entries
        ], indent=2))
        return
    table = Table(title=f"{len(entries)} models")
    for col in ("name", "task", "configs", "checkpoints", "custom ops"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.name, e.task, ", ".join(e.configs), ", ".join(e.checkpoint_formats) or "native",
                      ", ".join(e.custom_ops) or "-")
    console.print(table)


@app.command("export")
def export_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name (see `attnserve models`).")],
    config: Annotated[str, typer.Option("--config", "-c", help="Config preset.")] = "tiny",
    checkpoint: Annotated[Path | None, typer.Option(help=".pt/.pth/.bin or .safetensors weights.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp32; fp16 (half inputs, weights, outputs); mixed (fp16 with fp32 islands found by bisection, "
             "fp32 I/O); int8 (Q/DQ, calibrated).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Same as --precision fp16.")] = False,
    calibration: Annotated[Path | None, typer.Option(
        help="int8: a folder of images to calibrate on (default: the spec's example inputs).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer; 20 with custom ops).")] = 20,
    custom_ops: Annotated[bool, typer.Option(help="Use attnserve custom ops where present.")] = True,
    allow_mismatch: Annotated[bool, typer.Option(help="Write the model even if parity fails.")] = False,
    vocab: Annotated[list[str] | None, typer.Option(
        help="Text models: ROLE=FILE (source or target) or FILE for every role; saved beside the model.",
    )] = None,
    labels: Annotated[Path | None, typer.Option(
        help="Classifiers: a text file of class names, one per line, in class order.")] = None,
) -> None:
    """Export a model to ONNX and check it against the eager model on ONNX Runtime."""
    from attnserve.export import export_onnx
    from attnserve.export.precision import resolve_precision
    from attnserve.models import get_spec

    precision = resolve_precision(precision, fp16)
    vocabularies = {}
    for item in vocab or []:
        role, sep, path = item.partition("=")
        if not sep or "/" in role:  # a bare path
            role, path = "", item
        roles = [role] if role else list(get_spec(name, config).vocab_sizes) or ["source"]
        vocabularies.update({r: Path(path) for r in roles})
    out_dir = output or Path("out") / f"{name}-{config}{'' if precision == 'fp32' else '-' + precision}"
    doing = f"exporting {name} ({config}, {precision}) and checking parity on ONNX Runtime..."
    with console.status(doing) as status:
        result = export_onnx(
            name, out_dir, config=config, checkpoint=checkpoint, opset=opset, custom_ops=custom_ops,
            precision=precision, calibration=calibration, allow_mismatch=allow_mismatch,
            vocabularies=vocabularies, labels=labels, on_progress=status.update,
        )
    for report in result.parity:
        console.print(f"  parity {report.label}: {report.summary()}", highlight=False)
    graphs = [("", result.precision_report)] if result.precision_report else []
    graphs += list(result.part_precision.items())
    for part, decided in graphs:
        for line in decided.lines():
            console.print(f"  {part + ': ' if part and not line.startswith(' ') else ''}{line}",
                          highlight=False, soft_wrap=True)
    verdict = "[green]passed[/green]" if result.passed else "[red]FAILED (kept: --allow-mismatch)[/red]"
    console.print(f"wrote {result.onnx_path} ({result.precision}); parity {verdict}")


@app.command("verify")
def verify_cmd(
    onnx_path: Annotated[Path, typer.Argument(help="An export directory or .onnx file.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name (for a bare .onnx).")] = None,
    config: Annotated[str, typer.Option("--config", "-c")] = "tiny",
    checkpoint: Annotated[Path | None, typer.Option()] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes to check, comma-separated.")] = "1,3",
) -> None:
    """Check an exported model against the eager model; exit 1 on a mismatch."""
    from attnserve.export import verify_onnx

    batches = tuple(_csv_ints(batch, "--batch"))
    with console.status(f"checking {onnx_path} against the eager model..."):
        reports = verify_onnx(onnx_path, model, config, str(checkpoint) if checkpoint else None,
                              batch_sizes=batches)
    for r in reports:
        console.print(f"  {r.label}: {r.summary()}")
    failed = [r for r in reports if not r.passed]
    if failed:
        raise AttnserveError(
            f"{onnx_path} does not match the eager model: "
            + "; ".join(f"{r.label}: {', '.join(r.failures())}" for r in failed)
        )
    console.print("[green]parity passed[/green]")


@app.command("build-engine")
def build_engine_cmd(
    source: Annotated[Path, typer.Argument(
        help="An export directory or .onnx file (a part: DIR/PART/model.onnx).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Engine file or directory (default: model.engine beside the ONNX).")] = None,
    shape: Annotated[list[str] | None, typer.Option(
        help="NAME:MIN:OPT:MAX with shapes like 1x3x224x224 (NAME:SHAPE fixes it); repeatable.")] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch of the profiles derived from the spec.")] = 8,
    opt_batch: Annotated[int | None, typer.Option(
        help="Batch TensorRT tunes for (default: --max-batch).")] = None,
    precision: Annotated[str, typer.Option(
        help="fp32; fp16 or int8 (builder flags, TensorRT 10 only); onnx (strongly typed: the graph's).",
    )] = "fp32",
    workspace: Annotated[str | None, typer.Option(help="Builder workspace limit, e.g. 2G.")] = None,
    timing_cache: Annotated[Path | None, typer.Option(
        help="Timing cache to reuse and update (default: timing.cache beside the engine).")] = None,
    plugin: Annotated[list[str] | None, typer.Option(
        help="attnserve, or a plugin library file; repeatable (attnserve's are added for its custom ops).",
    )] = None,
    opt_level: Annotated[int | None, typer.Option(
        help="Builder optimisation level 0-5 (TensorRT: 3).")] = None,
    device: Annotated[int, typer.Option(help="CUDA device index.")] = 0,
) -> None:
    """Build a TensorRT engine and its sidecar (what it was built for) from an exported model."""
    from attnserve.runtime.engine_cache import sidecar_path
    from attnserve.runtime.tensorrt import (
        ProfilePolicy,
        build_engine,
        engine_path_for,
        parse_shape_option,
        parse_size,
        resolve_onnx,
    )

    profiles = dict(parse_shape_option(s) for s in shape or [])
    onnx = resolve_onnx(source)
    engine = engine_path_for(onnx, output)
    with console.status(f"building a TensorRT engine from {onnx}..."):
        path = build_engine(
            onnx, engine, profiles=profiles, precision=precision,
            workspace=parse_size(workspace) if workspace else None,
            timing_cache=timing_cache or engine.with_name("timing.cache"), plugins=tuple(plugin or ()),
            builder_optimization_level=opt_level, policy=ProfilePolicy(max_batch, opt_batch), device=device,
        )
    console.print(f"wrote {path} and {sidecar_path(path).name}")


@app.command("bench")
def bench_cmd(
    source: Annotated[str | None, typer.Argument(help="Model name, or an export directory.")] = None,
    backends: Annotated[str, typer.Option(help="torch, ort, openvino, triton.")] = "torch,ort",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8",
    concurrency: Annotated[str, typer.Option(help="Triton: concurrent clients, comma-separated.")] = "1,4,16",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or both (comma-separated).")] = "fp32",
    config: Annotated[str, typer.Option("--config", "-c")] = "tiny",
    checkpoint: Annotated[Path | None, typer.Option()] = None,
    threads: Annotated[int, typer.Option(help="Intra-op threads for every backend.")] = 2,
    warmup: Annotated[int, typer.Option(help="Untimed calls per backend and batch.")] = 5,
    iterations: Annotated[int, typer.Option(help="Timed calls per backend per window.")] = 20,
    windows: Annotated[int, typer.Option(help="Most windows before giving up on stability.")] = 10,
    stability: Annotated[float, typer.Option(help="Last three windows agree within this fraction.")] = 0.10,
    seconds: Annotated[float | None, typer.Option(help="Time budget per batch (and Triton point).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write result.json, report.md and plots here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    compare: Annotated[list[Path] | None, typer.Option(help="Two result.json files: what changed.")] = None,
    zoo: Annotated[bool, typer.Option(help="Every registered model at --config, one table.")] = False,
    python: Annotated[Path | None, typer.Option(help="Serving environment for the triton backend.")] = None,
) -> None:
    """Time backends side by side: p50/p90/p99, throughput, memory, stability, reports."""
    from attnserve.bench import benchmark_model, benchmark_zoo, report

    if compare:
        if len(compare) != 2:
            raise AttnserveError("--compare takes two result files: --compare a.json --compare b.json")
        console.print(report.compare(report.load_result(compare[0]), report.load_result(compare[1])),
                      highlight=False)
        return
    if iterations < 1 or warmup < 0 or threads < 0 or windows < 1 or stability <= 0:
        raise AttnserveError("--iterations and --windows must be >= 1, --warmup and --threads >= 0, "
                             "--stability > 0")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    options = dict(threads=threads, warmup=warmup, iterations=iterations, max_windows=windows,
                   stability=stability, seconds=seconds)
    if zoo:
        with console.status("benchmarking the zoo...") as status:
            results = benchmark_zoo(config=config, backends=names, batch=_csv_ints(batch, "--batch")[0],
                                    on_progress=lambda msg: status.update(msg), **options)
        table = report.zoo_markdown(results, backend=next((b for b in names if b != "torch"), "ort"))
        console.print(table, highlight=False)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "zoo.md").write_text(table)
            (out / "zoo.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        return
    if source is None:
        raise AttnserveError("name a model or an export directory to benchmark (or pass --zoo / --compare)")
    with console.status("benchmarking...") as status:
        result = benchmark_model(
            source, names, _csv_ints(batch, "--batch"), config=config,
            checkpoint=str(checkpoint) if checkpoint else None,
            precisions=[p.strip() for p in precision.split(",") if p.strip()],
            concurrency=_csv_ints(concurrency, "--concurrency"),
            serve_python=str(python) if python else None, on_progress=lambda msg: status.update(msg),
            **options,
        )
    print_benchmark(result)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if out:
        for path in report.write_reports(result, out):
            console.print(f"wrote {path}")


def print_benchmark(result) -> None:
    m = result.machine
    table = Table(title=f"{result.model} ({result.config}) on {m.get('cpu')}, {result.threads} threads")
    for col in ("backend", "prec.", "batch", "conc.", "p50 ms", "p99 ms", "samples/s", "x eager", "MB",
                "stable", "outputs"):
        table.add_column(col, justify="left" if col in ("backend", "prec.", "stable", "outputs") else "right")
    for r in result.rows:
        base = result.row("torch", r.batch_size)
        # Latency relative to eager: 0.40x means 2.5 times faster.
        ratio = f"{r.p50_ms / base.p50_ms:.2f}x" if base and r.concurrency == 1 else "-"
        table.add_row(
            r.backend, r.precision, str(r.batch_size), str(r.concurrency), f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.throughput:.1f}", ratio, f"{r.rss_mb:.0f}" if r.rss_mb is not None else "-",
            "yes" if r.stable else f"[yellow]no ({r.spread:.0%})[/yellow]",
            "ok" if r.correct else f"[red]WRONG ({r.max_abs_error:.2g})[/red]",
        )
    console.print(table)


@app.command("train")
def train_cmd(
    task: Annotated[str, typer.Argument(help="digits (stn, ram), captions (show_attend_tell, vit_captioner) "
                                             "or actions (vivit, nonlocal_i3d).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the checkpoints go.")] = Path(
        "out/checkpoints"),
    seed: Annotated[int, typer.Option(help="Seed of the data and the initialisation.")] = 0,
    reuse: Annotated[bool, typer.Option(
        help="Keep checkpoints of the same seed already in --output.")] = False,
) -> None:
    """Train a demo task's models on data made here (no download), held-out metrics included."""
    from attnserve.train import train_task

    with console.status(f"training {task}...") as status:
        results = train_task(task, output, seed=seed, reuse=reuse, on_progress=status.update)
    for r in results:
        metrics = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r.metrics.items())
        console.print(f"  {r.model} ({r.config}): {metrics}; {r.seconds:.0f} s -> {r.checkpoint}",
                      highlight=False)


@app.command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where everything goes.")] = Path("out/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the demo data and training.")] = 0,
    python: Annotated[Path | None, typer.Option(
        help="Interpreter of the serving environment (default: $ATTNSERVE_TRITON_PYTHON, else .venv-serve).")
    ] = None,
) -> None:
    """Train the demo models (or reuse them), export, serve on Triton, call with the client,
    time eager vs ONNX Runtime vs Triton, and write the attention pictures."""
    from attnserve.demo import run_demo

    run_demo(output, seed=seed, python=python,
             say=lambda line: console.print(line, highlight=False, soft_wrap=True),
             section=lambda title: console.rule(title))


repo_app = typer.Typer(help="Triton model repositories.", no_args_is_help=True)
app.add_typer(repo_app, name="repo")


@repo_app.command("build")
def repo_build_cmd(
    exports: Annotated[list[Path], typer.Argument(help="Export directories written by `attnserve export`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Repository to write.")] = Path("out/repo"),
    flavor: Annotated[str, typer.Option(
        help="native: Triton's ONNX Runtime backend (NGC container); python: ONNX Runtime inside the "
             "Python backend (the pip-installed server).")] = "native",
    max_batch_size: Annotated[int, typer.Option(help="Largest batch the dynamic batcher forms.")] = 8,
    preferred: Annotated[str, typer.Option(help="Preferred batch sizes, comma-separated.")] = "4,8",
    queue_delay_us: Annotated[int, typer.Option(help="Longest wait for a batch, in us.")] = 500,
    dynamic_batching: Annotated[bool, typer.Option(help="Batch concurrent requests in the server.")] = True,
    instances: Annotated[int, typer.Option(help="Model instances per device.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or gpu.")] = "cpu",
) -> None:
    """Write a Triton model repository (config.pbtxt from each model's spec)."""
    from attnserve.serving import ServingPolicy, build_repository

    policy = ServingPolicy(max_batch_size, tuple(_csv_ints(preferred, "--preferred")), queue_delay_us,
                           dynamic_batching, instances, device)
    repo = build_repository(exports, output, flavor, policy)
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        console.print(f"  {folder.name}")
    console.print(f"wrote {repo} ({flavor} flavor)")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@app.command("serve")
def serve_cmd(
    repo: Annotated[Path, typer.Argument(help="A model repository written by `attnserve repo build`.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (0: a free one).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: a free one).")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (0: a free one).")] = 8002,
    log_file: Annotated[Path, typer.Option(help="Where the server's log goes.")] = Path("tritonserver.log"),
    python: Annotated[Path | None, typer.Option(
        help="Interpreter of the serving environment "
             "(default: $ATTNSERVE_TRITON_PYTHON, else .venv-serve).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to come up.")] = 180.0,
    strict: Annotated[bool, typer.Option(help="Stop if any model fails to load.")] = False,
    docker: Annotated[bool, typer.Option(
        help="Only print the docker run command for the NGC container (native flavor).")] = False,
) -> None:
    """Serve a repository on a local tritonserver until Ctrl-C."""
    import signal
    import time

    from attnserve.serving import TritonServer, docker_command

    if docker:
        print(docker_command(repo))
        return
    server = TritonServer(repo, host=host, http_port=http_port or None, grpc_port=grpc_port or None,
                          metrics_port=metrics_port or None, log_file=log_file, python=python,
                          timeout_s=timeout, strict=strict)
    # `kill` (SIGTERM) stops the server too, as Ctrl-C does: never leave an orphan behind.
    signal.signal(signal.SIGTERM, _interrupt)
    with server:
        ready = sorted(n for n, state in server.models.items() if state == "READY")
        console.print(f"serving {len(ready)} model(s) from {repo}: {', '.join(ready)}")
        if server.failed:
            err_console.print(f"[yellow]warning:[/yellow] {server.describe_failures()}", highlight=False,
                              soft_wrap=True)
        console.print(f"HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  "
                      f"log {server.log_file}")
        console.print(f"in the NGC container (native flavor): {docker_command(repo)}", highlight=False,
                      soft_wrap=True)
        while server.running:
            time.sleep(0.5)
    raise AttnserveError(f"tritonserver stopped; its log is {log_file}")


@app.command("infer")
def infer_cmd(
    model: Annotated[str, typer.Argument(help="A served model, e.g. vit-s16 (see `attnserve serve`).")],
    source: Annotated[str, typer.Argument(help="An image or video file, or the text to translate.")],
    url: Annotated[str, typer.Option(help="host:port (gRPC 8001, HTTP 8000).")] = "localhost:8001",
    protocol: Annotated[str, typer.Option(help="grpc or http.")] = "grpc",
    top_k: Annotated[int, typer.Option(help="Classes to show.")] = 5,
    beam_width: Annotated[int, typer.Option(help="Beam width for text (1: greedy).")] = 1,
    stride: Annotated[int | None, typer.Option(help="Frames between video clips (default: a clip).")] = None,
    stream: Annotated[bool, typer.Option(help="Video: send frame by frame to the stream model.")] = False,
    png: Annotated[Path | None, typer.Option(help="Write attention per word, or the actions.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take.")] = 60.0,
    threshold: Annotated[float, typer.Option(help="Detection score threshold.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Generators: the seed of the latents.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run one input through a served model with the client SDK, by the model's task."""
    import dataclasses
    import json

    import numpy as np

    from attnserve.client import Client, ClientError, load_image, visualize

    with Client(url, protocol, timeout_s=timeout) as client:
        task = client.model_info(model).require_spec().task
        if task == "image-classification":
            result = client.classify(model, source, top_k=top_k)
        elif task == "video-classification":
            result = (list(client.stream_actions(model, source)) if stream else
                      client.recognize_actions(model, source, stride=stride, top_k=top_k))
            if png:
                visualize.save_png(visualize.action_timeline(result), png)
        elif task == "image-captioning":
            result = client.caption(model, source, beam_width=beam_width)
            if png:
                visualize.save_png(visualize.caption_attention(load_image(source), result), png)
        elif task == "translation":
            result = client.translate(model, source, beam_width=beam_width)
        elif task == "object-detection":
            result = client.detect(model, source, threshold=threshold)
            if png:
                boxes = [d.box for d in result] or np.zeros((0, 4))
                drawn = visualize.detection_boxes(load_image(source), np.asarray(boxes),
                                                  [d.label for d in result], [d.score for d in result])
                visualize.save_png(drawn, png)
        elif task == "image-generation":
            if not source.isdigit():
                raise ClientError(f"a generator takes a class id as its input, got {source!r}")
            image = client.generate_image(model, int(source), seed=seed)
            png = png or Path(f"{model}-class{source}-seed{seed}.png")
            visualize.save_png(image, png)
            result = []
        else:
            raise ClientError(f"{model} is a {task} model; `attnserve infer` handles image and video "
                              "classification, detection, captioning, translation and class-conditional "
                              "generation (use the SDK's infer())")
    if as_json:
        def plain(x):
            return x.tolist() if hasattr(x, "tolist") else str(x)

        rows = ([dataclasses.asdict(r) for r in result] if isinstance(result, list)
                else dataclasses.asdict(result))
        print(json.dumps(rows, default=plain))
    elif isinstance(result, list) and result and hasattr(result[0], "predictions"):
        for w in result:
            best = w.predictions[0]
            line = f"frames {w.start:>5}-{w.end:<5} {best.label:<24} {best.score:.3f}"
            console.print(line, highlight=False)
    elif isinstance(result, list) and result and hasattr(result[0], "box"):
        for d in result:
            box = ", ".join(f"{v:.1f}" for v in d.box)
            console.print(f"{d.score:.3f}  {d.label:<16} [{box}]", highlight=False)
    elif isinstance(result, list):
        for p in result:
            console.print(f"{p.score:.4f}  {p.label}  (class {p.class_id})", highlight=False)
    else:
        console.print(result.text, highlight=False)
        console.print(f"tokens {result.tokens}  score {result.score:.3f}", highlight=False)
    if png:
        console.print(f"wrote {png}")


def main() -> None:
    try:
        app()
    except AttnserveError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
