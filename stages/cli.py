"""`migm`: the command line.

    migm profile NAME          validate profiles/NAME.yaml and put it in place as params.yaml
    migm stage NAME [ARGS]     run one stage (what dvc.yaml calls), e.g. `migm stage extract --worker 1 --workers 2`
    migm check [FILE]          validate a params file without running anything
"""

import argparse
import importlib
import sys

from migm_shortcut.config import ConfigError, load_params, use_profile

STAGES = ("prepare", "tokenizer", "classifier", "base", "extract", "train_shortcut", "sample", "evaluate")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="migm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("profile", help="switch params.yaml to a profile").add_argument("name")
    stage = sub.add_parser("stage", help="run one pipeline stage")
    stage.add_argument("name", choices=STAGES)
    stage.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("check", help="validate a params file").add_argument("file", nargs="?", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            print(f"params.yaml <- profiles/{args.name}.yaml")
            use_profile(args.name)
        elif args.command == "check":
            load_params(args.file)
            print(f"{args.file}: valid")
        else:
            module = importlib.import_module(f"stages.{args.name}")
            sys.argv = [f"migm stage {args.name}", *args.args]
            module.main()
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
