"""House rules about the repository layout."""

import importlib
import platform
import sys
import sysconfig
from pathlib import Path

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
