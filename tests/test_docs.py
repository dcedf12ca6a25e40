"""The pages in docs/ for each stage run as written.

What a page's author can rely on (and must keep to):

- A ```python block runs. The blocks of one page run in order, in one namespace, in a
  fresh temporary working directory, as a reader would paste them into one session.
  An example checks its own result (an `assert`, or an `except` of the error it shows).
- A ```bash block is not run by default: every line that starts with `attnserve` is
  parsed by the real command line (the command must exist, its options too, and their
  values must convert), so paper-sized and GPU commands can be shown and still be
  checked.
- `<!-- run -->` on the line before a ```bash block: its `attnserve` lines also run, in
  process, in order with the page's Python blocks and in the same working directory,
  and each must exit with 0.
- `<!-- needs: gpu -->` on the line before a block: the block needs an NVIDIA GPU with
  TensorRT and cuda-python, which the machines these tests run on do not have. It is
  not run; a Python block is compiled (so it is at least valid Python) and its test is
  reported as skipped with the reason. Its `attnserve` lines are still parsed.
- client.md talks to a server the test starts (a python-flavor repository of the tiny
  ViT, `vit-tiny`, on free ports). The page writes the addresses a reader's server has,
  `localhost:8001` (gRPC) and `localhost:8000` (HTTP); the test puts the real ones in
  their place before running the page.
- serving.md starts its own server: the test points `ATTNSERVE_TRITON_PYTHON` at
  `.venv-serve`, as a reader who runs the page outside the project directory would.
  Both pages are skipped where there is no `.venv-serve` (`make serve-env`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from attnserve.cli import app
from conftest import ROOT, SERVE_PYTHON

DOCS = ROOT / "docs"
# One page per stage, in the order a model goes through them.
PAGES = ["export.md", "runtime.md", "tensorrt.md", "serving.md", "client.md", "benchmarking.md"]
NEEDS = {"gpu": "needs an NVIDIA GPU with TensorRT 10+ and cuda-python (none here)"}
SERVER_PAGES = {"serving.md", "client.md"}
# What a reader's server listens on (attnserve serve's defaults) -> the fixture's URL attribute.
ADDRESSES = {"localhost:8001": "grpc_url", "localhost:8000": "http_url"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the first code line, 1-based
    lang: str
    code: str
    marker: str | None  # "run", "needs: gpu", or None

    @property
    def needs(self) -> str | None:
        if self.marker and self.marker.startswith("needs:"):
            return self.marker.removeprefix("needs:").strip()
        return None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    lines = (DOCS / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        comment = re.fullmatch(r"<!--\s*(.*?)\s*-->", before)
        marker = comment.group(1) if comment else None
        if marker and marker != "run" and not (marker.startswith("needs:") and
                                                 marker.removeprefix("needs:").strip() in NEEDS):
            raise AssertionError(f"{page}:{i + 1}: unknown marker <!-- {marker} -->; use 'run' or "
                                 f"'needs: {'|'.join(NEEDS)}'")
        found.append(Block(page, i + 2, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", marker))
        i = end + 1
    return found


def cli_lines(block: Block) -> list[list[str]]:
    """The `attnserve` command lines of a bash block, as argument lists (no program name)."""
    text = block.code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "attnserve":
            commands.append(words[1:])
    return commands


def parse_cli(args: list[str]) -> None:
    """Resolve the command and parse its arguments as the real CLI would, without running it."""
    command = typer.main.get_command(app)
    ctx = command.make_context("attnserve", list(args))
    while hasattr(command, "resolve_command"):  # a group: descend to the subcommand, as it would
        name, command, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)


def _all_blocks(lang: str | None = None) -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if lang is None or b.lang == lang]


@pytest.fixture(scope="module")
def docs_server(exported_tiny, tmp_path_factory):
    """A real tritonserver on a python-flavor repository of the tiny ViT, for client.md."""
    if not SERVE_PYTHON.exists():
        pytest.skip("no .venv-serve: run `make serve-env`")
    from attnserve.serving import TritonServer, build_repository

    root = tmp_path_factory.mktemp("docs-serving")
    repo = build_repository([exported_tiny("vit").out_dir], root / "repo", flavor="python")
    with TritonServer(repo, log_file=root / "tritonserver.log", python=SERVE_PYTHON) as server:
        yield server


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page, tmp_path, monkeypatch, request):
    runnable = [b for b in blocks(page) if b.needs is None and (b.lang == "python" or b.marker == "run")]
    assert any(b.lang == "python" for b in runnable), f"{page} has no Python example that runs here"
    addresses: dict[str, str] = {}
    if page in SERVER_PAGES:
        if not SERVE_PYTHON.exists():
            pytest.skip("no .venv-serve: run `make serve-env`")
        monkeypatch.setenv("ATTNSERVE_TRITON_PYTHON", str(SERVE_PYTHON))
    if page == "client.md":
        server = request.getfixturevalue("docs_server")
        addresses = {address: getattr(server, attribute) for address, attribute in ADDRESSES.items()}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "160")
    scope: dict = {"__name__": f"docs.{page}"}
    for block in runnable:
        for address, real in addresses.items():
            block = replace(block, code=block.code.replace(address, real))
        if block.lang == "python":
            # Padded so a traceback names the line of the page.
            exec(compile("\n" * (block.line - 1) + block.code, str(DOCS / page), "exec"), scope)
            continue
        commands = cli_lines(block)
        assert commands, f"{block.id}: a <!-- run --> block without an `attnserve` line"
        for args in commands:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (f"{block.id}: `attnserve {shlex.join(args)}` exited with "
                                           f"{result.exit_code}: {result.output}{result.exception!r}")


@pytest.mark.parametrize("block", [b for b in _all_blocks() if b.needs], ids=lambda b: b.id)
def test_blocks_that_need_what_is_not_here(block):
    if block.lang == "python":
        compile("\n" * (block.line - 1) + block.code, str(DOCS / block.page), "exec")
    pytest.skip(f"{block.id}: {NEEDS[block.needs]}")


@pytest.mark.parametrize("args", [args for b in _all_blocks("bash") for args in cli_lines(b)],
                         ids=lambda args: " ".join(args)[:60])
def test_cli_lines_parse(args):
    parse_cli(args)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", (DOCS / page).read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (DOCS / file).resolve() if file else DOCS / page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{page} links to what does not exist: {broken}"
