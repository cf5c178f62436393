"""The package's layout: imports point one way (no cycle, function-level imports included), no private
name crosses a module boundary, and the public API comes from the top level without loading torch."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import tracin_index

PACKAGE = Path(tracin_index.__file__).parent


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("tracin_index", include_external_packages=False)
    cycles = [(a, b) for a in sorted(graph.modules) for b in sorted(graph.find_modules_directly_imported_by(a))
              if graph.chain_exists(importer=b, imported=a)]  # fmt: skip
    assert cycles == []


def test_the_layers_contract_holds():
    """The contracts in pyproject.toml ([tool.importlinter]): cli > serve > index | exact > build | search >
    storage > gradients > kg | results > files | machine | errors | version."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(PACKAGE.parent / "pyproject.toml")) == 0


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_imports(path: Path, module: str) -> list[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if not source.startswith("tracin_index"):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{module}:{node.lineno} imports {source}.{alias.name}")
            if source.rpartition(".")[2].startswith("_"):
                found.append(f"{module}:{node.lineno} imports from private module {source}")
    return found


def test_no_private_name_is_imported_across_modules():
    found = [problem for path in sorted(PACKAGE.rglob("*.py")) for problem in _private_imports(path, _module_name(path))]
    assert found == []


def test_the_private_import_check_finds_one(tmp_path):
    """The check above can fail: a module that imports another's private helper is named."""
    bad = tmp_path / "probe.py"
    bad.write_text("from .settle import _something\nfrom ..storage.layout import sha256_file\n")
    assert _private_imports(bad, "tracin_index.search.probe") == ["tracin_index.search.probe:1 imports tracin_index.search.settle._something"]


PUBLIC = """
import sys
import tracin_index
loaded_early = "torch" in sys.modules
from tracin_index import GradientIndex, TracInAnalyzer, TracInCheckpointCallback, load_run, BuildSettings
missing = [name for name in tracin_index.__all__ if getattr(tracin_index, name, None) is None]
print(loaded_early, missing, GradientIndex.__module__, TracInAnalyzer.__module__, TracInCheckpointCallback.__module__)
"""


def test_the_public_api_is_at_the_top_level_and_import_is_light():
    done = subprocess.run([sys.executable, "-c", PUBLIC], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "[]", "tracin_index.index", "tracin_index.exact", "tracin_index.kg.callback"]
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        tracin_index.nothing_here  # noqa: B018
