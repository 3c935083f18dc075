"""The benchmark's arms are checked by the same validation as ``purify train`` before anything trains."""

import pytest

from purify.bench import lm_suites
from purify.bench.report import BenchError, check_conditions


def test_bad_arms_refused_together_with_train_messages():
    arms = [("x", [{"name": "tail_truncation", "top_p": 0.9}, {"name": "ensemble"}], ["teacher", "reference"], {}),
            ("y", [{"name": "divergence_mask", "reference": "others"}], ["teacher"], {}),
            ("z", [{"name": "divergence_mask", "mode": "replace", "reference": "base"}], ["teacher"], {"loss": "ce"}),
            ("fine", [{"name": "anchor", "weight": 0.1}], ["teacher"], {})]
    with pytest.raises(BenchError) as err:
        check_conditions(arms)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("x: purifiers[1].name: ensemble rebuilds the targets")
    assert lines[1].startswith("y: purifiers[0].reference: 'others' needs at least 2 teachers")
    assert lines[2].startswith("z: purifiers[0]") and "loss.name" in lines[2]


def test_library_config_dataclasses_are_checked_too():
    from purify.purifiers.ensemble import EnsembleConfig
    from purify.purifiers.tail_truncation import TailTruncationConfig

    with pytest.raises(BenchError, match="ensemble rebuilds"):
        check_conditions([("arm", [TailTruncationConfig(top_p=0.9), EnsembleConfig()], ["a", "b"], {})])


def test_every_shipped_lm_arm_passes_train_validation():
    swept, _ = lm_suites._probe_free_arms()
    conds = lm_suites._core(True) + lm_suites._purifier_conditions(False) + swept
    check_conditions((c.name, c.purifiers, c.teachers, {"loss": c.loss}) for c in conds)
    assert any(c.purifiers for c in conds)


def test_every_suites_default_seeds_are_disjoint_from_its_tuning_seeds():
    """A suite's default run reports on held-out seeds: nothing checked it, so a new suite (or a choice recorded on
    seeds inside a default range) could report on its tuning seeds by default."""
    import importlib
    import inspect

    from purify.cli import SUITES

    for suite, module_name in SUITES.items():
        module = importlib.import_module(module_name)
        defaults = inspect.signature(module.run_suite).parameters
        first, count = defaults["first_seed"].default, defaults["seeds"].default
        tuned = getattr(module, "TUNED_ON", None) or []
        entries = [e for group in (tuned.values() if isinstance(tuned, dict) else [tuned]) for e in group]
        looked = {s for e in entries if e.get("trait", True) for s in e["seeds"]}
        assert not looked & set(range(first, first + count)), (suite, sorted(looked & set(range(first, first + count))))
