"""Imports point one way: the entry points (``rlhf.cli``, ``rlhf.quickstart``) above
``actors``, above ``rlhf``, above ``rewards``. Every module is parsed (imports inside functions
and ``importlib.import_module("...")`` with a literal name included); the checker itself is
tested on a small tree with every kind of wrong-way import."""

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"rewards": 0, "rlhf": 1, "actors": 2}
ENTRY_POINTS = ("rlhf.cli", "rlhf.quickstart")
TOP = max(LAYERS.values()) + 1


def layer(module: str) -> int | None:
    """The layer of a module of ours (None: not ours)."""
    if any(module == e or module.startswith(e + ".") for e in ENTRY_POINTS):
        return TOP
    return LAYERS.get(module.split(".")[0])


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for everything the module imports; ``from a import b`` yields both
    ``a`` and ``a.b`` (``b`` may be a submodule, e.g. ``from rlhf import cli``)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here[: len(here) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def wrong_way_imports(root: Path) -> list[str]:
    """``path:line: a imports b`` for every import of a higher layer under ``root``."""
    found = []
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            is_package = rel.name == "__init__"
            module = ".".join(rel.parts[:-1] if is_package else rel.parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for line, target in _imports(tree, module, is_package):
                to = layer(target)
                if to is not None and to > layer(module):
                    found.append(f"{path.relative_to(root)}:{line}: {module} imports {target}")
    return found


def test_imports_point_one_way():
    found = wrong_way_imports(ROOT)
    assert not found, "wrong-way imports:\n" + "\n".join(found)


def test_the_check_finds_every_kind_of_wrong_way_import(tmp_path):
    files = {
        "rewards/__init__.py": "",
        "rewards/ok.py": "import torch\nfrom rewards.base import check_images\n",
        "rewards/up.py": "from rlhf import draft\n",
        "rlhf/__init__.py": "",
        "rlhf/cli.py": "from actors.coordinator import Coordinator\nfrom rlhf import quickstart\n",
        "rlhf/quickstart.py": "def main():\n    from actors.run_config import RunConfig\n",
        "rlhf/ok.py": "from rewards.scoring import score_and_grad\nfrom . import draft\n",
        "rlhf/lazy.py": "def f():\n    import actors.reward_client\n",
        "rlhf/sub/__init__.py": "from ..cli import main\n",
        "actors/__init__.py": "",
        "actors/ok.py": "from rlhf.draft import draft_step\nfrom .options import actor_options\n",
        "actors/entry.py": "from rlhf import cli\n",
        "actors/dynamic.py": "import importlib\nimportlib.import_module('rlhf.quickstart')\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    found = sorted(wrong_way_imports(tmp_path))
    assert found == [
        "actors/dynamic.py:2: actors.dynamic imports rlhf.quickstart",
        "actors/entry.py:1: actors.entry imports rlhf.cli",
        "rewards/up.py:1: rewards.up imports rlhf",
        "rewards/up.py:1: rewards.up imports rlhf.draft",
        "rlhf/lazy.py:2: rlhf.lazy imports actors.reward_client",
        "rlhf/sub/__init__.py:1: rlhf.sub imports rlhf.cli",
        "rlhf/sub/__init__.py:1: rlhf.sub imports rlhf.cli.main",
    ]
