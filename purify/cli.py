"""The ``purify`` command line: ``purify VERB ...``. Heavy imports happen inside each verb so ``--help`` is fast.

Verbs: ``train`` (run a recipe), ``lineage show`` (print a provenance record). Every verb has ``--help``.
Errors in user input (a recipe key, a data file, a path) print one line ``purify: error: …`` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EPILOG = "Run `purify VERB --help` for a verb's options. Docs: README.md."


def _train(args: argparse.Namespace) -> int:
    from purify.config import load_recipe
    from purify.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = train(recipe)
    print(f"purify: run written to {out}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    import json

    from purify.lineage import format_lineage, read_lineage

    record = read_lineage(args.path)
    print(json.dumps(record, indent=2) if args.json else format_lineage(record))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distil a student from a recipe",
                       description="Train a student on teacher outputs as a recipe describes. Any recipe key can be "
                                   "overridden as key=value (omegaconf dotlist), e.g. trainer.max_steps=20 "
                                   "loss.name=jsd loss.beta=0.5 resume=outputs/run/checkpoints/last.ckpt",
                       epilog="Example: purify train recipes/quickstart.yaml output_dir=outputs/qs")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_train)


def _add_lineage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="print a model's lineage record",
                       description="Print the provenance record (lineage.json) of a run, export or checkpoint.")
    lsub = p.add_subparsers(dest="action", required=True)
    show = lsub.add_parser("show", help="print lineage.json of a run directory, export or file",
                           description="Print the lineage record: student base, teachers with hashes, data hashes, "
                                       "purifiers, metrics, versions, git sha.")
    show.add_argument("path", help="output_dir of a run, its student/ export, a .ckpt, or a lineage.json")
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    show.set_defaults(func=_lineage)


VERBS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_lineage]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every verb."""
    parser = argparse.ArgumentParser(prog="purify", description="Distil task knowledge from teachers without their "
                                     "behavioral fingerprint, and measure it.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    from purify.config import RecipeError
    from purify.data import DataError

    try:
        return int(args.func(args))
    except (RecipeError, DataError, FileNotFoundError) as err:
        print(f"purify: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
