"""The shape of the house, as tests: the format and the loader stay at the bottom, no
module imports in a circle, each plug-in declares the code its bytes depend on, and a
plug-in from another package registers through an entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "synthfactory"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """synthfactory modules a file imports anywhere in it (lazy imports in functions too)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
    return {name for name in found if name.startswith("synthfactory")}


def _is_module(name: str) -> bool:
    """A module or package of this checkout (looked up on disk: nothing is imported)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


GRAPH = {module_name(p): imported(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_itself_through_others():
    circles = sorted(name for name in GRAPH if name in reachable(name) and not name.endswith("__init__"))
    # a package's face may name its own modules; anything else in a circle is a design error
    assert [c for c in circles if not any(c == m.rpartition(".")[0] for m in GRAPH[c])] == []


@pytest.mark.parametrize("floor, forbidden", [
    ("synthfactory.samples", ("synthfactory.",)),
    ("synthfactory.shards", ("synthfactory.plugins", "synthfactory.generators", "synthfactory.checks",
                             "synthfactory.recipe", "synthfactory.release")),
    ("synthfactory.loader", ("synthfactory.plugins", "synthfactory.generators", "synthfactory.checks",
                             "synthfactory.recipe", "synthfactory.release", "synthfactory.validation")),
    ("synthfactory.release.build", ("synthfactory.validation", "synthfactory.registry", "synthfactory.release.publish")),
])
def test_lower_floors_do_not_import_upper_ones(floor, forbidden):
    allowed = {"synthfactory.samples", "synthfactory.files"} if floor == "synthfactory.samples" else set()
    above = sorted(m for m in reachable(floor) if m.startswith(forbidden) and m not in allowed)
    assert above == [], f"{floor} reaches {above}"


def test_the_loader_and_a_shard_worker_import_only_what_they_use():
    probe = textwrap.dedent("""
        import sys
        import synthfactory.loader
        loader = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "prefect", "great_expectations")
                        or m.startswith(("synthfactory.recipe", "synthfactory.plugins", "synthfactory.generators")))
        import tasks.generate
        worker = sorted(m for m in sys.modules if m.split(".")[0] in ("great_expectations", "dvc", "pandas"))
        print(loader, worker)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


#: modules that define interfaces and registries, not bytes
INTERFACES = {"synthfactory.plugins", "synthfactory.generators", "synthfactory.generators.base",
              "synthfactory.checks", "synthfactory.checks.base"}


def test_every_plugin_declares_the_code_its_output_depends_on():
    from synthfactory.checks import CHECKS
    from synthfactory.generators import GENERATORS
    from synthfactory.release.fingerprint import FORMAT_CODE

    for registry in (GENERATORS, CHECKS):
        for name in registry.names():
            plugin = registry.get(name)
            declared = {plugin.__module__, *plugin.code, *FORMAT_CODE}
            needed = set()
            for module in {plugin.__module__, *plugin.code}:
                path = PACKAGE.parent.joinpath(*module.split("."))
                needed |= imported(path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py")
            needed -= INTERFACES
            missing = sorted(needed - declared - {"synthfactory.samples", "synthfactory.files"})
            assert missing == [], f"{registry.kind} {name!r} uses {missing} without declaring them in `code`"


def test_a_plugin_from_another_package_registers_through_an_entry_point(tmp_path):
    package = tmp_path / "acme_synth"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "noise.py").write_text(textwrap.dedent('''
        from synthfactory.generators import GENERATORS, Generator, GeneratorParams, Sample

        @GENERATORS.register("noise-text")
        class NoiseText(Generator):
            Params = GeneratorParams
            version = "1"

            def generate(self, slots):
                for slot in slots:
                    yield Sample(slot, f"noise {slot.seed % 997}", {"txt": b"x"}, payload="txt")
    '''))
    dist = tmp_path / "acme_synth-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-synth\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[synthfactory.generators]\nnoise-text = acme_synth.noise\n")
    probe = textwrap.dedent("""
        from synthfactory.recipe import parse_recipe
        from synthfactory.release.bundle import plugins_of
        from synthfactory.release.fingerprint import code_files
        recipe = parse_recipe({"name": "noise", "samples": 3, "generator": {"kind": "noise-text"}})
        print(sorted(relative for _, relative in code_files(plugins_of(recipe).plugins)))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "acme_synth/noise.py" in result.stdout and "synthfactory/shards.py" in result.stdout
