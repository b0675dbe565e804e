"""Screenshot the MLflow UI's compare view of a sweep's or ablation's trials (docs/img/).

    python pipelines/screenshot.py --sweep NAME --tracking-uri sqlite:////abs/mlflow.db \\
        --out docs/img/mlflow_compare.png

Starts `mlflow server` on 127.0.0.1 over the store, renders the compare page of the sweep's
child runs in headless Chromium, and writes the PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from contrastlab import tracking
from contrastlab.sweep.report import find_sweep

# The MLflow server and Chromium helpers live in tests/ui.py, beside the UI tests that use
# them (tools stay out of the package); tests/ is not installed, so put the repository root
# on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import ui  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="sweep or ablation name")
    p.add_argument("--tracking-uri", required=True, help="sqlite:////abs/path/mlflow.db")
    p.add_argument("--out", type=Path, default=Path("docs/img/mlflow_compare.png"))
    p.add_argument("--max-runs", type=int, default=6)
    p.add_argument("--size", default="1400,1100", help="window width,height")
    args = p.parse_args()
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    exp_id, parent = find_sweep(uri, args.sweep)
    runs = tracking.child_runs(uri, exp_id, parent)
    runs = sorted(runs, key=lambda r: r.info.run_name)[: args.max_runs]
    w, h = (int(x) for x in args.size.split(","))
    with tempfile.TemporaryDirectory() as d, ui.mlflow_server(uri, d) as server:
        url = ui.compare_url(server, exp_id, [r.info.run_id for r in runs])
        print(ui.screenshot(url, args.out, size=(w, h)))


if __name__ == "__main__":
    main()
