"""Report of a finished sweep: leaderboard, best config, Optuna history/importance/slice/contour.

    python pipelines/report.py <sweep name> [--tracking-uri URI] [--out reports/<sweep>]

Everything is read from MLflow and logged back onto the sweep's parent run under report/.
All flags: ``python pipelines/report.py --help`` (the same as ``contrastlab report``).
"""

import sys

from contrastlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
