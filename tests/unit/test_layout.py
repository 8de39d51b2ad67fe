"""The package layout's import rules, checked on the source (see ARCHITECTURE.md, "Packages").

- ``orderflow.runtime`` (what a production process is made of) imports neither the
  command line (``orderflow.cli``) nor the tools (``orderflow.tools``);
- ``orderflow.tools`` never imports ``orderflow.cli``;
- nothing outside ``orderflow.devstand`` imports it, with one exception: the ``dev``
  command in ``orderflow/cli/main.py``, and only inside a function, so that ``consume``,
  ``relay`` and ``api`` never load it (tests and benchmarks are not checked: they may);
- ``consumer`` and ``outbox`` import nothing from ``orderflow``, and ``outbox`` nothing
  from ``consumer``.

Every import counts: at module level, inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The packages the rules speak of: everything that ships (tests and benchmarks do not).
CHECKED = ("consumer", "outbox", "orderflow", "migrations")


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, dotted
    path: str  # its file, relative to the root
    line: int
    #: What the statement imports, dotted: for ``from a import b`` both ``a`` and ``a.b``
    #: (``b`` may be a module).
    imported: tuple[str, ...]
    in_function: bool


@dataclass(frozen=True)
class Rule:
    """Modules under ``importers`` must not import modules under ``forbidden``, unless
    the importer is outside ``unless_within`` or is one of ``allowed``."""

    name: str
    importers: str
    forbidden: str
    unless_within: str | None = None
    #: (file, only inside a function): the narrow exceptions.
    allowed: tuple[tuple[str, bool], ...] = ()


RULES = (
    Rule("the runtime never imports the command line", "orderflow.runtime", "orderflow.cli"),
    Rule("the runtime never imports the tools", "orderflow.runtime", "orderflow.tools"),
    Rule("the tools never import the command line", "orderflow.tools", "orderflow.cli"),
    Rule(
        "only the dev command imports the dev stand",
        "",
        "orderflow.devstand",
        unless_within="orderflow.devstand",
        allowed=(("orderflow/cli/main.py", True),),
    ),
    Rule("consumer never imports orderflow", "consumer", "orderflow"),
    Rule("outbox never imports orderflow", "outbox", "orderflow"),
    Rule("outbox never imports consumer", "outbox", "consumer"),
)


def _under(module: str, package: str) -> bool:
    return package == "" or module == package or module.startswith(package + ".")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> Iterator[Import]:
    """Every module ``path`` imports, wherever the import statement stands."""
    importer = module_name(path, root)
    is_package = path.name == "__init__.py"
    relative_path = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            names = _imported_names(child, importer, is_package)
            if names:
                line = child.lineno  # type: ignore[attr-defined]
                yield Import(importer, relative_path, line, tuple(names), inside)
            yield from visit(child, inside)

    yield from visit(tree, False)


def _imported_names(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # `from orderflow import devstand` imports orderflow.devstand: count both names.
        return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    if (
        isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
        )
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def violations(root: Path, packages: tuple[str, ...] = CHECKED) -> list[str]:
    found: list[str] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for item in imports_of(path, root):
                for rule in RULES:
                    if not _under(item.importer, rule.importers):
                        continue
                    hits = [name for name in item.imported if _under(name, rule.forbidden)]
                    if not hits:
                        continue
                    if rule.unless_within and _under(item.importer, rule.unless_within):
                        continue
                    if any(
                        item.path == allowed and (item.in_function or not only_in_function)
                        for allowed, only_in_function in rule.allowed
                    ):
                        continue
                    where = "inside a function" if item.in_function else "at module level"
                    found.append(
                        f"{item.path}:{item.line}: imports {hits[0]} ({where}): {rule.name}"
                    )
    return sorted(set(found))


# --------------------------------------------------------------------------- the real tree


def test_the_source_keeps_the_layout_rules() -> None:
    assert violations(ROOT) == []


def test_the_checker_sees_the_tree_it_checks() -> None:
    """Not vacuous: the wings exist, and the one allowed dev-stand import is found (and
    is inside a function)."""
    for wing in ("cli", "runtime", "tools", "devstand"):
        assert (ROOT / "orderflow" / wing / "__init__.py").is_file(), wing
    main = ROOT / "orderflow" / "cli" / "main.py"
    devstand = [
        i
        for i in imports_of(main, ROOT)
        if any(_under(name, "orderflow.devstand") for name in i.imported)
    ]
    assert devstand
    assert all(i.in_function for i in devstand)


# --------------------------------------------------------------------------- the checker


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    for directory in [p for p in root.rglob("*") if p.is_dir()]:
        (directory / "__init__.py").touch()
    return root


CLEAN = {
    "orderflow/runtime/services.py": "from orderflow.runtime import settings\n",
    "orderflow/tools/replay.py": "from orderflow.runtime.services import consumer_config\n",
    "orderflow/cli/main.py": textwrap.dedent(
        """\
        from orderflow.tools import replay

        def dev():
            from orderflow.devstand.dev import run_dev
        """
    ),
    "orderflow/devstand/dev.py": "from orderflow.devstand import embedded\n",
    "consumer/apply.py": "import outbox.enqueue\n",
    "outbox/relay.py": "from outbox import faults\n",
}


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    ("file", "source", "rule"),
    [
        (
            "orderflow/runtime/services.py",
            "from orderflow.tools.progress import RateLimiter\n",
            "the runtime never imports the tools",
        ),
        (
            "orderflow/runtime/health.py",
            "def serve():\n    import orderflow.cli.support\n",
            "the runtime never imports the command line",
        ),
        (
            "orderflow/runtime/wiring.py",
            "from .. import cli\n",
            "the runtime never imports the command line",
        ),
        (
            "orderflow/tools/dlq.py",
            "from orderflow.cli import support\n",
            "the tools never import the command line",
        ),
        (
            "orderflow/tools/upstream.py",
            "from orderflow.devstand.embedded import free_port\n",
            "only the dev command imports the dev stand",
        ),
        (
            "orderflow/cli/teams.py",
            "def tail():\n    from orderflow.devstand import dev\n",
            "only the dev command imports the dev stand",
        ),
        (
            "orderflow/cli/main.py",
            "from orderflow.devstand.dev import run_dev\n",  # at module level: every command
            "only the dev command imports the dev stand",
        ),
        (
            "orderflow/api.py",
            "import importlib\nimportlib.import_module('orderflow.devstand.embedded')\n",
            "only the dev command imports the dev stand",
        ),
        (
            "orderflow/runtime/signals.py",
            "import typing\nif typing.TYPE_CHECKING:\n    from orderflow import tools\n",
            "the runtime never imports the tools",
        ),
        ("consumer/intake.py", "from orderflow.runtime import settings\n", "consumer never"),
        ("outbox/relay.py", "def f():\n    import orderflow\n", "outbox never imports orderflow"),
        (
            "outbox/enqueue.py",
            "from consumer.models import Order\n",
            "outbox never imports consumer",
        ),
    ],
)
def test_a_broken_rule_is_reported(tmp_path: Path, file: str, source: str, rule: str) -> None:
    root = _tree(tmp_path, {**CLEAN, file: CLEAN.get(file, "") + source})
    found = violations(root)
    assert len(found) == 1, found
    assert found[0].startswith(f"{file}:")
    assert rule in found[0]
