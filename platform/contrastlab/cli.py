"""The ``contrastlab`` command line.

contrastlab train [CONFIG.yaml] [--set key=value ...]   train locally (no Ray)
contrastlab train --resume RUN_DIR                      continue an interrupted run
contrastlab config [CONFIG.yaml] [--set key=value ...]  print the resolved config
"""

from __future__ import annotations

import argparse
import json
import sys

from contrastlab.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: built-in digits run)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set method.temperature=0.2 (repeatable)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from contrastlab.train import load_run_config, train

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError(
                "--resume continues a run with its saved config; "
                "do not pass a config file or --set with it"
            )
        cfg = load_run_config(args.resume)
        result = train(cfg, run_dir=args.resume, resume=True)
    else:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, run_dir=args.run_dir)
    print(json.dumps({"run_dir": str(result.run_dir), **result.final}, indent=2))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contrastlab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model locally")
    _add_config_args(p_train)
    p_train.add_argument("--run-dir", help="run directory (default: train.output_dir/<time>)")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="resume from RUN_DIR's checkpoint")
    p_train.set_defaults(func=_cmd_train)
    p_cfg = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p_cfg)
    p_cfg.set_defaults(func=_cmd_config)
    args = parser.parse_args(argv)
    from contrastlab.data import DataError
    from contrastlab.train import CheckpointError, DivergenceError

    try:
        return args.func(args)
    except (ConfigError, DataError) as e:  # bad input: say what and where, no traceback
        print(f"contrastlab: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, DivergenceError) as e:
        print(f"contrastlab: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
