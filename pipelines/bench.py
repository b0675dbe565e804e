"""The GPU benchmark command, ``python pipelines/bench.py --workers 8``: runs the training-step
benchmark, ``benchmarks/step.py`` (same flags as ``python -m benchmarks.step``; its docstring
has the commands)."""

import sys
from pathlib import Path

# benchmarks/ is a folder beside the package, not installed: put the repository root on the
# path, as `python -m benchmarks.step` from the root does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="pipelines/bench.py"))
