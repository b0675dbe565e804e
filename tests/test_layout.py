"""House rules about the repository layout."""

import ast
import importlib
import platform
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_platform_is_the_standard_library():
    # a package named `platform` on sys.path would shadow the stdlib and break Ray workers
    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert callable(platform.python_version)
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_platform_not_importable_as_package_from_repo_root(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # what `ray job submit --working-dir .` does
    saved = sys.modules.pop("platform")
    try:
        mod = importlib.import_module("platform")
        assert hasattr(mod, "python_version"), "repo's platform/ shadows the stdlib"
    finally:
        sys.modules["platform"] = saved


def test_every_method_has_its_file_and_tests():
    from contrastlab.methods import METHODS

    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in METHODS:
        assert (ROOT / "platform" / "contrastlab" / "methods" / f"{name}.py").is_file(), name
        assert f'"{name}"' in tests_text, f"no test mentions method {name!r}"
        assert (ROOT / "search_spaces" / f"{name}.yaml").is_file(), f"no search space: {name}"


def test_the_package_imports_no_tools():
    """Tools live beside the library: benchmarks, tests and pipelines import contrastlab, never
    the other way round (an installed package has none of them)."""
    tools = {"benchmarks", "tests", "pipelines"}
    for path in sorted((ROOT / "platform" / "contrastlab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            used = {n.split(".")[0] for n in names} & tools
            assert not used, f"{path.relative_to(ROOT)}:{node.lineno} imports {used}"


def test_modules_share_public_names_only():
    """No module of the package imports another's underscore name: what modules share is
    their public API (a shared helper is made public where it lives)."""
    for path in sorted((ROOT / "platform" / "contrastlab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or "contrastlab" in (node.module or "")
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports {private}"


@pytest.mark.parametrize("script", ["pipelines/bench.py", "pipelines/screenshot.py"])
def test_scripts_that_use_tools_run_from_any_directory(script, tmp_path):
    # pipelines/bench.py (the GPU benchmark command) runs benchmarks/step.py, screenshot.py
    # uses tests/ui.py: neither folder is installed, so the scripts find them themselves
    out = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stdout + out.stderr


def test_the_readme_is_a_guide_that_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, "README.md: move detail into docs/*.md"
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages.append(ROOT / "search_spaces" / "README.md")
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
