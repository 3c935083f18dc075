"""Benchmarks (``purify bench``): trait transfer against fidelity, vanilla distillation beside each purifier.

- :mod:`purify.bench.stats` — means with Student-t intervals, paired tests, the true early-stopping frontier,
  the share of vanilla's transfer a purifier removes.
- :mod:`purify.bench.report` — ``summary.json``/``.md``/``.csv``, ``frontier.png`` and ``env.json``.
- :mod:`purify.bench.lm_common` — the spine every suite runs on: the one ``Condition``, per-seed loop
  (``run_conditions``), seed scheduler (``run_seeds``), ``summarise`` (verdicts from :mod:`~purify.bench.verdicts`)
  and LM report writer (``publish``).
- :mod:`purify.bench.aux_logits` — the subliminal-learning MNIST analogue on sklearn digits (``run_suite``), with
  its per-seed teachers and students (:mod:`~purify.bench.aux_runs`), data (:mod:`~purify.bench.digits`), its
  summary blocks and notes (:mod:`~purify.bench.aux_summary`) and the bench-only oracle that knows the trait
  (:mod:`~purify.bench.oracle`).
- :mod:`purify.bench.lm_suites` — the language-model suites (style-tic, hidden-preference).
- :mod:`purify.bench.real_lm` — what the real-model suites share (sampling and caching the teachers' data, the run;
  their students are :mod:`purify.topblocks`, their trait readout :func:`purify.readouts.score_model`):
  owl-smollm2 (:mod:`~purify.bench.owl`), tic-smollm2 (:mod:`~purify.bench.tic_smollm2`), owl-ft-smollm2
  (:mod:`~purify.bench.owl_finetuned`).

Submodules are imported on use; importing this package loads nothing heavy.
"""
