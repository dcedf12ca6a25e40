"""The README's Python example runs as written, and its CLI tour names real commands."""

import re
from pathlib import Path

import pytest

from attnserve.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has a Python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:  # in order, as a reader would paste them
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["logits"].shape == (4, 10)
    assert scope["best"].tokens and len(scope["best"].attention) == len(scope["best"].tokens)


@pytest.mark.parametrize("line", re.findall(r"^attnserve (\w[\w-]*)", README, flags=re.M))
def test_tour_commands_exist(line):
    assert line in {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}


def test_the_catalog_has_a_row_for_every_registered_model():
    from attnserve.models import list_models

    catalog = README[README.index("## The catalog"):README.index("## On a GPU box")]
    rows = set(re.findall(r"^\| `(\w+)` \|", catalog, flags=re.M))
    assert rows == set(list_models())
