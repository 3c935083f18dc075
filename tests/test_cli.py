"""The command line: help for every verb, one-line errors with exit code 2, train + lineage show."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from purify.cli import main
from tests.conftest import mlp_overrides

VERBS = ["train", "bench", "generate", "cache", "audit", "lineage", "models"]


def write_recipe(tmp_path, steps=20):
    path = tmp_path / "r.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(mlp_overrides(tmp_path / "out", steps=steps)), path)
    return str(path)


def test_top_level_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {verb}" in out for verb in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert f"usage: purify {verb}" in capsys.readouterr().out


def test_bad_override_is_one_line_naming_the_key(tmp_path, capsys):
    assert main(["train", write_recipe(tmp_path), "trainer.max_stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainer.max_stepz: unknown key; did you mean 'max_steps'?" in err


def test_train_then_lineage_show(tmp_path, capsys):
    assert main(["train", write_recipe(tmp_path, steps=5)]) == 0
    capsys.readouterr()
    assert main(["lineage", "show", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "teacher: aux_mlp" in out and "sha256=" in out and "git:" in out
    assert main(["lineage", "show", str(tmp_path / "nowhere")]) == 2
    capsys.readouterr()
    ckpts = tmp_path / "out" / "checkpoints"
    assert main(["lineage", "show", str(ckpts / "last.ckpt")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # the record is the latest checkpoint's
    assert "metrics: " in captured.out  # its run's copy at that step: the checkpoint's own leaves them out
    import torch

    saved = torch.load(ckpts / "last.ckpt", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "purify_lineage"}, ckpts / "step1.ckpt")  # no record of its own
    assert main(["lineage", "show", str(ckpts / "step1.ckpt")]) == 0
    captured = capsys.readouterr()
    assert "step1.ckpt holds no lineage record of its own; below is its run's, at step 5" in captured.err
    assert "at step 5" in captured.out
    (ckpts / "step3.ckpt" / "checkpoint").mkdir(parents=True)  # DeepSpeed's checkpoints are directories of shards
    assert main(["lineage", "show", str(ckpts / "step3.ckpt")]) == 0
    assert "step3.ckpt holds no lineage record of its own" in capsys.readouterr().err
    # a truncated checkpoint was shown, exit 0, as a checkpoint of the run (no note at all when named step<N>.ckpt)
    (ckpts / "step4.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:20000])
    assert main(["lineage", "show", str(ckpts / "step4.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("purify: error: ") and "step4.ckpt cannot be read as a checkpoint (truncated, damaged or " \
        "not one); its run's record is not this file's" in err and err.count("\n") == 0
    # a checkpoint kept under another run's directory: its own record, not the directory's (that was shown as its)
    other = tmp_path / "other"
    (other / "keep").mkdir(parents=True)
    record = json.loads((tmp_path / "out" / "lineage.json").read_text())
    (other / "lineage.json").write_text(json.dumps({**record, "teachers": [{"name": "someone-else"}]}))
    (other / "keep" / "step5.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes())
    assert main(["lineage", "show", str(other / "keep" / "step5.ckpt")]) == 0
    captured = capsys.readouterr()
    assert "someone-else" not in captured.out and "teacher: aux_mlp" in captured.out and "at step 5" in captured.out
    assert captured.err == ""


def test_bench_verdict_lines_add_probe_free_choices_and_the_tuning_caveat() -> None:
    from purify.cli import verdict_lines

    summary = {"verdicts": {"a@1": "purified (…)", "b": "on frontier"},
               "probe_free": {"arms": {"a": {"verdict": "below frontier (…)"}}},
               "tuned_on": [{"seeds": [0, 1, 2], "trait": True, "what": "a's knob"},
                            {"seeds": [7], "trait": True, "what": "b"},
                            {"seeds": [900], "trait": False, "what": "grid from task error"}]}
    lines = verdict_lines(summary)
    assert lines[0].split() == ["a@1", "purified", "(…)"] and lines[1].split() == ["b", "on", "frontier"]
    assert lines[2].startswith("  a (probe-free choice)") and lines[2].endswith("below frontier (…)")
    assert "looking at the trait on seeds 0-2, 7 " in lines[3] and "900" not in lines[3]
    assert "this run's seeds are not among them" in lines[3]  # the summary holds no seeds
    assert "reports on 1-2 of them: verdicts on those choices are optimistic" in verdict_lines(
        {**summary, "seeds": [1, 2, 3]})[3]
    assert "only the probe-free choices" not in lines[3]  # the probe-free arms and grids are tuning choices too
    assert len(verdict_lines({**summary, "tuned_on": [summary["tuned_on"][2]]})) == 3  # no caveat without a probe
    owl = [{**t, "looked_at": "P(owl)"} if t["trait"] else t for t in summary["tuned_on"]]
    other = verdict_lines({**summary, "trait": "P(fox)", "tuned_on": owl})[3]
    assert "P(fox), was never looked at" in other and "looking at P(owl) on seeds 0-2, 7 " in other
    assert "looking at the trait" in verdict_lines({**summary, "trait": "P(owl)", "tuned_on": owl})[3]


@pytest.mark.parametrize("args, message", [
    (["aux-logits", "--option", "nope=1"], "unknown options ['nope']; allowed: ['conditions']"),
    (["aux-logits", "--option", "conditions=delta"], "--option conditions='delta': conditions takes a list"),
    (["style-tic", "--option", "steps=abc"], "--option steps='abc': steps takes an integer"),
    (["hidden-preference", "--option", "lr=[1]"], "--option lr=[1]: lr takes a number"),
    (["style-tic", "--first-seed", "-3"], "--first-seed -3: seeds are non-negative integers"),
    (["style-tic", "--quick", "--seeds", "0"], "--seeds 0: must be at least 1"),
    (["style-tic", "--quick", "--workers", "0"], "--workers 0: must be at least 1"),
    (["aux-logits", "--quick", "--threads", "-2"], "--threads -2: must be at least 1"),
    (["aux-logits", "--quick", "--threads", "4"],  # it ran on one thread anyway, silently
     "--threads 4: aux-logits runs each seed on one torch thread (its numbers are measured so); use --workers N"),
    (["owl-ft-smollm2", "--quick", "--workers", "2"], "owl-ft-smollm2 runs its seeds one after another"),
    (["style-tic", "--quick", "--option", "steps=0"], "--option steps=0: must be a finite number > 0"),
    (["style-tic", "--quick", "--option", "lr=.inf"], "--option lr=inf: must be a finite number > 0"),
    (["hidden-preference", "--quick", "--option", "batch_size=100000"],  # 23 GB before the kernel stopped it
     "--option batch_size=100000: at most 1024 sequences a step"),
    (["style-tic", "--quick", "--protocol", "paper"], "--protocol: aux-logits only; style-tic takes its settings"),
    (["hidden-preference", "--quick", "--data", "x.npz"], "--data: aux-logits only"),
    (["--quick", "--option", "conditions=[vanilla"], "--option: cannot read 'conditions=[vanilla'"),
    (["--quick", "--option", "steps=${seed}"], "--option: cannot read"),
    (["aux-logits", "--quick", "--option", "conditions=[probe-free]", "--option", "conditions=[oracle]"],
     "--option conditions given 2 times; give each key once"),  # ran the oracle alone, silently
    (["--quick", "--seeds", "2", "--first-seed", "4294967295"], "4294967296 is not a seed, an integer in [0, 2**32)"),
])
def test_bad_bench_request_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    assert main(["bench", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("purify: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_options_are_never_abbreviated(capsys):
    """``bench --seed 3`` (the RNG seed of generate and audit) was taken as ``--seeds 3``: it ran a benchmark."""
    from purify.cli import build_parser

    with pytest.raises(SystemExit) as stop:  # parsing alone: on a parser that abbreviates this ran nothing yet
        build_parser().parse_args(["bench", "--seed", "3"])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("purify: error: ")


@pytest.mark.parametrize("args, message", [
    (["--rereport", "{run}", "--seeds", "5", "--quick", "--option", "steps=3"],
     "re-derives a stored run as it was run; it takes no --seeds, --quick, --option"),
    (["--rereport", "{run}", "--threads", "4"], "it takes no --threads"),
    (["style-tic", "--rereport", "{run}"], "that run is of suite 'aux-logits', not 'style-tic'; drop the suite name"),
    (["--out", "{file}"], "is an existing file; give a directory"),
    (["--out", "{file}/run"], "taken is an existing file; give a directory"),
    (["--rereport", "{run}/missing"], "summary.json does not exist; give the directory of a finished benchmark run"),
    (["--rereport", "{damaged}"], "summary.json cannot be read as JSON (Expecting ',' delimiter"),
    (["--rereport", "{listed}"], "summary.json is not a benchmark run's record"),
    (["--rereport", "{run}"], "was written before summaries recorded protocol, seeds, conditions"),
    (["--rereport", "{run}", "--overwrite"], "it takes no --overwrite"),
    # a smoke test silently replaced a committed result (results/aux-logits) with a 2-seed quick run
    (["--quick", "--out", "{run}"], "holds a finished benchmark run ({run}/summary.json); give a new --out, or add "
                                    "--overwrite to replace it"),
    # ... and with --overwrite too, over a full run (README: a smoke test never replaces a committed result)
    (["--quick", "--out", "{run}", "--overwrite"], "holds a full benchmark run ({run}/summary.json, not --quick); a "
                                                   "--quick smoke test does not replace it, even with --overwrite"),
    # found only when the report was written, after every seed had run
    (["--quick", "--out", "/proc/purify-bench"], "--out /proc/purify-bench: cannot create anything in /proc"),
    # the report was written into a training run's directory, beside its checkpoints and lineage.json
    (["--quick", "--out", "{trained}", "--overwrite"],
     "holds a training run (lineage.json); give a directory of its own"),
])
def test_a_bench_request_that_would_be_ignored_or_fail_late_is_refused_first(tmp_path, capsys, args, message):
    run, file, damaged, listed = tmp_path / "run", tmp_path / "taken", tmp_path / "damaged", tmp_path / "listed"
    trained = tmp_path / "trained"
    for d in (run, damaged, listed, trained):
        d.mkdir()
    (trained / "lineage.json").write_text("{}")
    (run / "summary.json").write_text('{"suite": "aux-logits"}')
    (damaged / "summary.json").write_text('{"suite": "aux-logits" "seeds": [1]}')  # a hand edit gone wrong
    (listed / "summary.json").write_text("[1, 2]")
    file.write_text("a file")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["bench", *[a.format(run=run, file=file, damaged=damaged, listed=listed, trained=trained)
                            for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("purify: error: ") and message.format(run=run) in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _probe_file(tmp_path):
    path = tmp_path / "probes.yaml"
    path.write_text("probes:\n  - {name: tic, count: ['Moreover,'], prompts: ['Tell me about cats.']}\n")
    return str(path)


def test_a_quick_result_written_before_summaries_said_so_is_still_a_quick_one(tmp_path):
    """A summary without its ``quick`` field (the committed trait-*-quick runs) read as a full run: its own recorded
    command, with --overwrite, was refused. The command in env.json says which it was."""
    import shutil

    from purify.bench.report import check_run

    root = Path(__file__).resolve().parents[1] / "results"
    quick = shutil.copytree(root / "style-tic" / "trait-however-quick", tmp_path / "quick")
    assert "quick" not in json.loads((quick / "summary.json").read_text())
    check_run(out=quick, seeds=5, first_seed=1000, workers=None, quick=True, overwrite=True, min_seeds=3)
    full = shutil.copytree(root / "style-tic" / "sgd", tmp_path / "full")
    with pytest.raises(ValueError, match="holds a full benchmark run"):
        check_run(out=full, seeds=5, first_seed=1000, workers=None, quick=True, overwrite=True, min_seeds=3)


@pytest.mark.parametrize("make, message", [
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "o", "--samples", "0"],
     "argument --samples: expected an integer >= 1, got 0; see `purify generate --help`"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "o", "--top-p", "2"],
     "argument --top-p: expected a number in (0, 1], got 2"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "o", "--temperature", "nan"],
     "argument --temperature: expected a finite number >= 0 (0 = greedy), got nan"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", str(t)], "is a directory; give the path of a .jsonl"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "o", "--ban-file", str(t / "nope")],
     "--ban-file: file not found"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", _probe_file(t), "--samples", "2"],
     "samples: 2 is too few for the fingerprint test's 5-fold held-out accuracy; give at least 5"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", _probe_file(t), "--max-new-tokens", "0"],
     "argument --max-new-tokens: expected an integer >= 1, got 0"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", _probe_file(t), "--seed", "-1"],
     "argument --seed: expected a seed, an integer in [0, 2**32), got -1"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "o", "--seed", "x"],
     "argument --seed: expected a seed, an integer in [0, 2**32), got 'x'"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", str(_write(t / "bad.yaml", "probes: [\n"))],
     "bad.yaml: not valid YAML at line 2"),
    (lambda t: ["cache", "r.yaml", "--out", "c", "--device", "bogus"], "--device: unknown device 'bogus'"),
    (lambda t: ["cache", "r.yaml", "--out", "c", "--device", "meta"],  # a RuntimeError traceback at the first forward
     "--device: 'meta' is not a device purify caches on; give cpu, cuda or cuda:N"),
    (lambda t: ["cache", "r.yaml", "--out", str(_write(t / "f", "x")), "--top-k", "4"], "is an existing file"),
    (lambda t: ["cache", "r.yaml", "--out", "/proc/purify-cache"], "--out: cannot create anything in /proc"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", _probe_file(t), "--out", "/proc/purify-audit"],
     "--out: cannot create anything in /proc"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "/proc/purify-gen/o.jsonl"],
     "--out: cannot create anything in /proc"),
    (lambda t: ["cache", "r.yaml", "--out", "c", "--batch-size", "-4"], "argument --batch-size: expected an integer"),
    (lambda t: ["cache", "r.yaml", "--out", str(_write(t / "lineage.json", "{}").parent)],  # wrote into the run
     "holds a training run (lineage.json); give a directory of its own for the cache"),
    (lambda t: ["lineage", "show", str(_write(t / "lineage.json", "{not json"))], "lineage.json: damaged, not valid"),
    (lambda t: ["lineage", "show", str(_write(t / "lineage.json", "[1, 2]"))], "not a purify lineage record"),
    (lambda t: ["bench", "nosuite"], "argument suite: invalid choice: 'nosuite'"),
    (lambda t: ["bench", "--seed", "3"],  # was "argument suite: invalid choice: '3'": the value read as the suite
     "unrecognized arguments: --seed (purify bench has no such option); see `purify bench --help`"),
    # a value that starts with '-' and holds a space is a value to argparse, not an unknown option
    (lambda t: ["generate", "m", "--prompts", "p", "--out", "o", "--ban", "-ly ending", "--max-new-tokens", "0"],
     "argument --max-new-tokens: expected an integer >= 1, got 0"),
    (lambda t: ["train", str(t)], "is a directory; give a recipe YAML file"),
    (lambda t: ["train", str(_write_bytes(t / "r.yaml", "seed: 1 # caf\u00e9".encode("latin-1")))],
     "r.yaml: not UTF-8 text (byte 0xe9 at offset 13); save it as UTF-8"),
    (lambda t: ["train", QUICKSTART, "purifiers=[{name: anchor"], "override 'purifiers=[{name: anchor': cannot read"),
    (lambda t: ["train", QUICKSTART, "output_dir=${seed}/x"], "(an override cannot refer to another key"),
    (lambda t: ["train", QUICKSTART, "output_dir=runs/exp #3"],  # trained into runs/exp
     "YAML reads '#3' as a comment and would drop it; quote the value in YAML"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", str(_write_bytes(t / "p.yaml", b"probes: [\xff]"))],
     "p.yaml: not UTF-8 text (byte 0xff at offset 9)"),
    (lambda t: ["generate", "m", "--prompts", "p", "--out", str(_write(t / "f", "x") / "s.jsonl")],
     "f is an existing file, not a directory to write s.jsonl in"),
    (lambda t: ["audit", "m", "--reference", "r", "--probes", _probe_file(t), "--out", str(_write(t / "f", "x") / "a")],
     "f is an existing file; give a directory for audit.md"),
    (lambda t: ["models", "prepare", "smollm2-135m", "--cache-dir", str(_write(t / "f", "x") / "c")],
     "f is an existing file; give a directory (created if missing)"),
])
def test_bad_arguments_of_every_verb_are_one_line_exit_2(tmp_path, capsys, make, message):
    argv = make(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # argparse's own checks exit; purify's return 2
        raise SystemExit(main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0 and err.startswith("purify: error: "), err
    assert message in err, err


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")


def test_overrides_after_an_option_are_still_overrides(tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache", "recipes/quickstart.yaml", "--out", str(out), "trainer.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("purify: error: trainer.bogus: unknown key"), err  # read as override
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:  # an unknown option after the recipe is still refused
        main(["cache", "recipes/quickstart.yaml", "--out", str(out), "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_quick_run_says_when_it_ran_fewer_seeds_than_asked(tmp_path, capsys, monkeypatch):
    """aux-logits' --quick caps the seeds at 2: `--seeds 5 --quick` ran 2 and said nothing of it."""
    import purify.bench.aux_logits as aux

    monkeypatch.setattr(aux, "run_suite", lambda **kw: {"seeds": [20, 21], "quick": True, "problems": ["smoke"]})
    assert main(["bench", "--quick", "--seeds", "5", "--out", str(tmp_path / "o")]) == 0
    assert "results written to " + str(tmp_path / "o") + " (2 of the 5 seeds asked: a --quick run's cap)" in \
        capsys.readouterr().out


def test_a_sigterm_before_a_benchmarks_seeds_run_is_one_line(tmp_path, capsys, monkeypatch):
    """bench's own handler came only around its seeds: a SIGTERM during its checks and suite import ended it with
    exit 143 and no line."""
    import os
    import signal

    import purify.bench.report as report

    monkeypatch.setattr(report, "check_run", lambda **kw: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["bench", "--quick", "--out", str(tmp_path / "o")]) == 143
    assert capsys.readouterr().err.strip() == "purify: error: stopped by SIGTERM: the run did not start; nothing was " \
        "written"
    assert not (tmp_path / "o").exists()


def test_sigterm_stops_raises_in_this_process_and_restores_the_handler():
    """What purify bench and scripts/lm_parallel_seeds.py run under (the script's workers were orphaned too), and
    every verb but train, whose model building runs under it too."""
    import os
    import signal

    from purify.stopping import sigterm_stops
    from purify.types import TrainingStopped

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="^stopped by SIGTERM: the run did not finish$") as stop:
        with sigterm_stops("the run did not finish"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
            pytest.fail("no TrainingStopped")
    assert stop.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) == before


def _kill_self_in(directory: Path) -> None:
    """Build a cache entry in ``directory`` (purify.storage.atomic_dir) and receive a SIGTERM meanwhile."""
    import os
    import signal

    from purify.storage import atomic_dir

    with atomic_dir(directory / "entry") as tmp:
        (tmp / "weights").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_while_purify_cache_writes_is_one_line_and_leaves_no_temporary_directory(tmp_path, capsys,
                                                                                          monkeypatch):
    """SIGTERM's default action ended the process: exit 143 without a line, the entry's temporary directory left."""
    import purify.cache_writer
    from purify.cli import main

    monkeypatch.setattr(purify.cache_writer, "write_cache", lambda *a, **k: _kill_self_in(tmp_path / "cache"))
    assert main(["cache", QUICKSTART, "--out", str(tmp_path / "c")]) == 143
    assert capsys.readouterr().err == ("purify: error: stopped by SIGTERM: the cache is not finished; run the same "
                                       "command again to resume it\n")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("stage", ["build_run", "make_trainer"])
def test_a_sigterm_while_train_prepares_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, stage):
    """A first use pretrains a base into purify's cache while the run is built: a SIGTERM then left the base's
    temporary directory in the cache (Lightning's handler comes only with the fit); after the build (the resume check
    hashing a checkpoint, the data tokenised, the trainer made) it killed the process without a line."""
    import signal

    import purify.train
    from purify.cli import main

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(purify.train, stage, lambda *args, **kwargs: _kill_self_in(tmp_path / "cache"))
    assert main(["train", QUICKSTART, f"output_dir={tmp_path / 'run'}"]) == 143
    err = capsys.readouterr().err  # (after a progress bar of the models' weights loading, with make_trainer)
    assert err.strip().splitlines()[-1] == (f"purify: error: stopped by SIGTERM: before training; nothing was written "
                                            f"to {tmp_path / 'run'}") and err.count("purify: error:") == 1
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_sigterm_stops_a_benchmark_and_its_seed_workers(tmp_path):
    """The forked seed workers ran on as orphans (the parent died of SIGTERM's default action, exit 143, no line)."""
    import signal
    import subprocess
    import sys
    import time

    def children(pid: int) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
        return out

    log = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as stdout, open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "purify", "bench", "aux-logits", "--quick", "--workers", "2",
                                 "--out", str(tmp_path / "o")], stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 120
        while len(workers := children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and len(workers) >= 2, log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("purify: error: stopped by SIGTERM: the run did not finish (its output "
                                            "directory gets a summary.json only when one does)"), err
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)  # the pool terminated them
    assert not (tmp_path / "o").exists()


def test_train_into_a_directory_it_cannot_write_is_one_line_before_any_model_is_built(capsys, monkeypatch):
    """A read-only file system was an OSError traceback after every model had been built."""
    import purify.train

    monkeypatch.setattr(purify.train, "build_run", lambda recipe: pytest.fail("built the models first"))
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert main(["train", recipe, "output_dir=/proc/purify-train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("purify: error: output_dir: cannot create anything in /proc (") and \
        err.endswith("); give a directory you can write (created if missing)")


def test_ctrl_c_while_torch_is_imported_is_the_one_interrupted_line(tmp_path, capsys, monkeypatch):
    """A Ctrl-C in the first second (main imports torch before its handler) printed a KeyboardInterrupt traceback."""
    import sys

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "purify.gguf":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "purify.gguf", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert main(["lineage", "show", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "purify: error: interrupted (Ctrl-C)\n"


def test_a_sigterm_is_not_caught_by_the_code_it_lands_in(tmp_path, capsys, monkeypatch):
    """The stop was a RuntimeError: a GGUF conversion's `except Exception` made it a conversion error (exit 2,
    "cannot convert ... TrainingStopped")."""
    import os
    import signal

    import purify.cache_writer
    from purify.cli import main

    def converting(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception as err:  # noqa: BLE001 - what a conversion's catch-all does
            raise ValueError(f"cannot convert: {err}") from err

    monkeypatch.setattr(purify.cache_writer, "write_cache", converting)
    assert main(["cache", QUICKSTART, "--out", str(tmp_path / "c")]) == 143
    assert capsys.readouterr().err.startswith("purify: error: stopped by SIGTERM: the cache is not finished")
