"""`migm`: the command line.

    migm profile NAME          validate profiles/NAME.yaml and split it into params.yaml (the
                               experiment) and config/ (every other setting)
    migm stage NAME [ARGS]     run one stage (what dvc.yaml calls), e.g. `migm stage extract --worker 1 --workers 2`
    migm check [FILE]          validate a params file (with the config/ beside it) without running
                               anything
    migm parent                the MLflow parent run of this pipeline run (made if missing): a
                               flow makes it before its units start, so they cannot race to make two
    migm pick --max-loss 5%    the fastest evaluated configuration within 5% (or, without %, an
                               absolute amount) of the reference's quality; --min-speedup 3: the
                               best quality at 3x or faster; --write narrows params.yaml's sample
                               grid to the choice and the reference vanilla, for a confirming run
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

from migm_shortcut import pick
from migm_shortcut.config import ConfigError, load_params, use_profile

STAGES = ("prepare", "tokenizer", "classifier", "reference", "base", "extract", "train_shortcut",
          "sample", "evaluate")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="migm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profile", help="switch params.yaml and config/ to a profile").add_argument("name")
    stage = sub.add_parser("stage", help="run one pipeline stage")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("check", help="validate a params file").add_argument("file", nargs="?", default="params.yaml")
    sub.add_parser("parent", help="the MLflow parent run of this pipeline run")
    picker = sub.add_parser("pick", help="the configuration that answers a speed or quality budget")
    question = picker.add_mutually_exclusive_group(required=True)
    question.add_argument("--max-loss", help="quality loss allowed vs the reference: 5%% (relative) or 2.0 (absolute)")
    question.add_argument("--min-speedup", type=float, help="speedup vs the reference the choice must reach")
    picker.add_argument("--metrics", type=Path, default=Path("data/report/metrics.json"), help="the evaluated grid")
    picker.add_argument("--params", type=Path, default=Path("params.yaml"))
    picker.add_argument("--write", action="store_true", help="narrow the params file's sample grid to the choice")
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            print(f"params.yaml, config/ <- profiles/{args.name}.yaml")
            use_profile(args.name)
        elif args.command == "check":
            load_params(args.file)
            print(f"{args.file}: valid")
        elif args.command == "pick":
            run_pick(args)
        elif args.command == "parent":
            from .common import params, parent_run  # imports torch: only here

            print(parent_run(params()))
        else:
            module = importlib.import_module(f"stages.{args.name}")
            sys.argv = [f"migm stage {args.name}", *args.args]
            module.main()
    except (ConfigError, pick.PickError) as err:
        sys.exit(f"error: {err}")


def run_pick(args) -> None:
    reference_steps = load_params(args.params).sampling.steps
    if not args.metrics.is_file():
        raise ConfigError(f"{args.metrics}: no evaluated grid; run the pipeline first (`dvc repro`)")
    rows = pick.evaluated_rows(json.loads(args.metrics.read_text()))
    quality = pick.rows_quality(rows)
    if args.max_loss is not None:
        max_loss, relative = pick.parse_loss(args.max_loss)
        choice = pick.fastest_within_loss(rows, reference_steps, quality, max_loss, relative)
    else:
        choice = pick.best_at_speedup(rows, quality, args.min_speedup)
    print(pick.describe(choice, pick.reference_row(rows, reference_steps), quality))
    if args.write:
        pick.write_choice(args.params, choice, reference_steps)
        print(f"{args.params}: sample grid narrowed to {choice['name']} and the reference vanilla-N{reference_steps}")


if __name__ == "__main__":
    main()
