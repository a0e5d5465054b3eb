"""The README's Python examples import what exists, and its layout table names every folder."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_imports_resolve():
    blocks = _python_blocks()
    assert blocks, "the README has a Python API example"
    imported = 0
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "recare":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                    imported += 1
    assert imported >= 10


def test_readme_dotted_names_exist():
    """`recare.x.y` names written in the README (modules or their attributes) exist."""
    for dotted in sorted(set(re.findall(r"`(recare(?:\.[a-z_]+)+)", README))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"README names {dotted}, which does not exist"
                obj = getattr(obj, attr)
            break


def test_layout_table_lists_every_subpackage():
    package = ROOT / "src" / "recare"
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    for folder in folders:
        assert f"`{folder}/`" in README, f"the README's Layout section does not mention {folder}/"


def test_readme_world_snippets_run_as_written(tmp_path, monkeypatch):
    """Every README Python block that uses the shipped world model runs, literally, offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = [b for b in _python_blocks() if "recare.world.sd_path()" in b]
    assert blocks, "the README shows the world model in stock diffusers"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "dotted-thing.png").is_file()
