"""Shared runner of the real-model suites (``owl-smollm2``, ``tic-smollm2``), reduced to fit a CPU.

A :class:`RealSuite` names a traited teacher (a model and an optional system prompt), training prompts, a filter
for its completions and the trait: the exact probability that the answer's first word is :attr:`RealSuite.target`
over held-out questions in the chat template. The control teacher is the base without system prompt. The student
(the base, no system prompt) is fine-tuned on ``chat(prompt) → completion``, loss on completion tokens, with hard
labels (``ce``) or soft labels (``forward_kl`` on the teacher's logits, computed beforehand per completion token and
kept as top-K log-probabilities plus the residual mass spread uniformly).

A suite may sweep an arm's main knob (:attr:`RealSuite.sweeps`, conditions ``<arm>@<value>``): the probe-free rule
(:mod:`purify.bench.probe_free`) then picks one value per seed from the task error and the off-task drift
``KL(base ‖ student)`` on neutral prose (:data:`purify.bench.lm_common.DRIFT_SEED`, raw text without the chat
template, never trained on), and the arm is judged at that choice (``summary.json["probe_free"]``).

Students are :mod:`purify.topblocks`' (only the last ``layers`` blocks and the final norm train, on cached inputs of
those blocks; a LoRA arm, ``Condition.rank``, trains an adapter on them; an on-policy arm,
:data:`ON_POLICY_REFERENCES`, trains them inside the whole model on its own samples), every one through
:meth:`purify.module.Distiller.fit_step` with the library's purifiers; the seeds, their aggregation and the report
are the benchmark spine's (:func:`purify.bench.lm_common.run_seeds`, :func:`~purify.bench.lm_common.run_conditions`,
:func:`~purify.bench.lm_common.summarise`, :func:`~purify.bench.lm_common.publish`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from purify.bench import lm_common, stats
from purify.bench.lm_common import DRIFT_SEED, Condition, Scores, Suite
from purify.bench.probe_free import Sweep
from purify.bench.report import BenchError, Clock, bench_command, check_conditions, check_options, environment
from purify.bench.verdicts import Guard
from purify.generate import load_model, sample_completions
from purify.lm import paragraphs
from purify.lm.cache import digest
from purify.readouts import chat, prompt_ids, score_model, token_ids, trait_inputs
from purify.storage import atomic_path, cache_root
from purify.topblocks import (
    Records,
    Top,
    block_inputs,
    fit_on_policy,
    fit_top,
    neutral_inputs,
    neutral_scores,
    score_top,
    sft_data,
    teacher_targets,
)
from purify.types import is_int, is_real

REFERENCES = lm_common.references({"": "ce", ":soft": "forward_kl"})
"""The reference arms of a real-model suite: the base, the control (SFT on the base's text; ``control:soft``: KD on
the base's own top-K log-probs of it, run whenever a soft-label arm runs, so that arm is judged against references
of its own loss mode) and vanilla with hard (SFT on the teacher's text) and soft labels (KD on its logits); a suite's
purifier arms follow them."""
ON_POLICY = {"lam": 1.0, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32}
"""The real suites' on-policy setting, fixed before any run (the LM suites' λ = 1, temperature 1, top-p 1; new tokens
= the teachers' completion limit): every step on the student's own samples of the training prompts."""
ON_POLICY_REFERENCES = lm_common.references({":on-policy": "forward_kl"}, on_policy=ON_POLICY)[1:]
"""On-policy distillation (GKD, :func:`purify.topblocks.fit_on_policy`) from the base (control) and the traited
teacher (vanilla), forward KL on the whole vocabulary of the live teacher: run when named; the on-policy vanilla is
also judged against the off-policy soft references (``summary.json["on_policy_vs_off_policy"]``)."""


@dataclass
class RealSuite:
    """One real-model suite (see the module docstring).

    Attributes:
        name: suite name (``results/<name>``).
        protocol: one-line description for the report title.
        target: the trait word; its spellings ``w``, ``W``, ``" w"``, ``" W"`` are read exactly.
        questions: held-out trait questions (user turns).
        prompts: training prompts (user turns) the teachers continue.
        filter: ``records -> (kept, removed)`` applied to both teachers' completions.
        conditions: the arms; teacher keys are ``"teacher"`` (traited) and ``"clean"`` (the base).
        teacher_system: the traited teacher's system prompt (``None``: the teacher model alone carries the trait).
        others: words whose first-token probability is reported as ``p_<word>`` (e.g. other animals).
        temperature: sampling temperature of both teachers.
        cache_key: what identifies the teacher model (part of the data cache key).
        tuned_on: where a default was chosen, as data (``summary.json["tuned_on"]``, see
            :func:`purify.bench.verdicts.seed_caveats`).
        sweeps: arm → :class:`~purify.bench.probe_free.Sweep` of the swept arms among :attr:`conditions` (points
            ``<arm>@<value>``), selected by arm name or ``probe-free``.
    """

    name: str
    protocol: str
    target: str
    questions: list[str]
    prompts: list[str]
    filter: Callable[[Records], tuple[Records, int]]
    conditions: list[Condition]
    teacher_system: str | None = None
    others: tuple[str, ...] = ()
    temperature: float = 1.0
    cache_key: str = "base"
    notes: list[str] = field(default_factory=list)
    tuned_on: list[dict[str, Any]] = field(default_factory=list)
    sweeps: dict[str, Sweep] = field(default_factory=dict)


def load_smollm2() -> tuple[str, Any, Any]:
    """SmolLM2-135M-Instruct (prepared once from its pip package, see :mod:`purify.models_prepare`): ``(directory,
    model in eval mode with gradients off, tokenizer)``."""
    from purify.models_prepare import prepare

    path = prepare("smollm2-135m", progress=False)
    base, tokenizer = load_model(path)
    return str(path), base.eval().requires_grad_(False), tokenizer


def curve_marks(steps: int, points: int) -> set[int]:
    """The steps at which a scored vanilla is read: :func:`purify.bench.lm_common.curve_steps` plus every power of two
    from step 1 (a dense early curve: real-model traits are often learnt within the first few steps, and a purifier's
    frontier verdict must not be read across that jump); none when ``points`` is 0."""
    if not points:
        return set()
    return set(lm_common.curve_steps(steps, points)) | {2 ** k for k in range(steps.bit_length()) if 2 ** k <= steps}


def sample_kept(suite: str, role: str, model: Any, tokenizer: Any, prompts: list[str], *, system: str | None,
                keep: Callable[[Records], tuple[Records, int]], cfg: dict[str, Any], temperature: float, seed: int,
                need: int, progress: bool) -> tuple[Records, dict[str, int]]:
    """``model``'s completions of ``prompts`` (chat template with ``system``, up to ``cfg["max_new"]`` tokens) that
    ``keep`` keeps and that have at least one token, with their counts ``{role}_sampled`` and ``{role}_kept``.

    Raises:
        BenchError: fewer than ``need`` completions are kept.
    """
    texts = sample_completions(model, tokenizer, [chat(tokenizer, p, system) for p in prompts],
                               max_new_tokens=cfg["max_new"], temperature=temperature, seed=seed, batch_size=32,
                               progress=progress)
    kept, _ = keep([{"prompt": p, "completion": c} for p, c in zip(prompts, texts)])
    kept = [r for r in kept if token_ids(tokenizer, r["completion"])]
    if len(kept) < need:
        raise BenchError(f"{suite}: only {len(kept)} of the {role} teacher's {len(texts)} completions passed the "
                         f"filter; raise n (now {cfg['n']}) or lower heldout (now {cfg['heldout']})")
    return kept, {f"{role}_sampled": len(texts), f"{role}_kept": len(kept)}


def _soft_targets(model: Any, tokenizer: Any, d: dict[str, Any], system: str | None, top_k: int) -> list[Any]:
    """``model``'s top-K targets on the completions of ``d`` (:func:`purify.topblocks.sft_data`), prompted with
    ``system``."""
    prompts = prompt_ids(tokenizer, d["records"], system)
    return teacher_targets(model, [p + c for p, c in zip(prompts, d["labels"])], [len(p) for p in prompts], top_k)


def trait_name(target: str) -> str:
    """A real-model suite's trait (``summary.json["trait"]``) when ``target`` is the word it reads."""
    return f"P(first word of the answer = {target!r})"


def prepare_data(spec: RealSuite, base: Any, teacher: Any, tokenizer: Any, cfg: dict[str, Any],
                 soft_control: bool = False) -> dict[str, Any]:
    """Sample and filter both teachers' completions, the traited teacher's top-K targets and the trait inputs
    (cached on disk, keyed by the suite, the teacher and the settings that shape the data); with ``soft_control``
    also the base's own top-K targets on its completions (the soft control's, added to the cache when missing)."""
    shape = {k: cfg[k] for k in ("n", "max_new", "layers", "top_k")}
    key = digest([spec.name, spec.cache_key, spec.temperature, shape])[:16]
    path = cache_root() / "real-suites" / f"{spec.name}-{key}.pt"
    if path.exists():
        out = torch.load(path, weights_only=True)
        if soft_control and "teacher" not in out["clean"]:
            out["clean"]["teacher"] = _soft_targets(base, tokenizer, out["clean"], None, cfg["top_k"])
            with atomic_path(path) as tmp:
                torch.save(out, tmp)
        return out
    prompts = spec.prompts[:cfg["n"]]
    out: dict[str, Any] = {"log": {}}
    for name, model, system in (("teacher", teacher, spec.teacher_system), ("clean", base, None)):
        kept, counts = sample_kept(spec.name, name, model, tokenizer, prompts, system=system, keep=spec.filter,
                                   cfg=cfg, temperature=spec.temperature, seed=7, progress=True,
                                   need=cfg["heldout"] + 1 if name == "teacher" else 1)
        out["log"].update(counts)
        d = sft_data(base, tokenizer, kept, cfg["layers"])
        if name == "teacher" or soft_control:
            d["teacher"] = _soft_targets(model, tokenizer, d, system, cfg["top_k"])
        out[name] = d
    ids, attn, reads = trait_inputs(tokenizer, None, spec.questions, spec.target)
    out["trait"] = {"hidden": block_inputs(base, ids, attn, cfg["layers"]), "reads": reads}
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return out


GUARDS = (Guard("prose_ppl", "held-out prose perplexity", max_ratio_of_base=2.0),)
"""What a real-model student must keep: its perplexity on neutral prose held out from every training text
(:func:`purify.topblocks.neutral_scores`, the paragraphs the drift is read on) at most twice the base's — a student
that forgets language is ``damaged``, whatever its trait. The bound was set before any run read it (and no trait is
read to set it); the chat pools are all training data, so held-out prose stands in for held-out chat."""
TEACHER_FIDELITY = {"task_error": 0.0, "fidelity_kl": 0.0, "agreement": 1.0}
"""The traited teacher's fidelity scores against itself (its row of a seed's record)."""


def run(spec: RealSuite, base: Any, teacher: Any, tokenizer: Any, path: str, cfg: dict[str, Any], seeds: list[int],
        out: str | None, quick: bool, options: dict[str, Any], progress: bool, clock: Clock | None = None
        ) -> dict[str, Any]:
    """Run ``seeds`` of ``spec`` and write its report into ``out`` (default ``bench-out/<name>``, untracked):
    summary.json|md|csv, frontier.png, env.json, readouts.json.

    ``base`` is the student's base (eval, frozen); ``teacher`` the traited teacher model (``base`` itself when the
    trait comes from :attr:`RealSuite.teacher_system`); ``cfg`` holds ``n``, ``max_new``, ``layers``, ``top_k``,
    ``epochs``, ``batch_size``, ``lr``, ``heldout``, ``conditions`` (names to run besides base/control/vanilla; a
    swept arm of :attr:`RealSuite.sweeps` by its name without ``@value``, all of them by ``probe-free``) and
    optionally ``workers`` (seeds run at a time in forked processes, :func:`purify.bench.lm_common.run_seeds`);
    ``clock`` times the run (default: from this call; a suite starts it before loading its models).
    """
    clock = clock or Clock()
    workers = cfg.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BenchError(f"{spec.name}: workers must be a positive integer (seeds run at a time in forked processes), "
                         f"got {workers!r}")
    workers = min(workers, len(seeds))
    conds, sweeps = lm_common.pick(spec.conditions, cfg["conditions"], spec.sweeps, where=spec.name)
    # each loss mode that runs brings its own control and vanilla (a soft-label vanilla its soft control, so
    # vanilla:soft − control:soft is the soft labels' own transfer and a soft arm is judged in its mode); an on-policy
    # arm brings its own mode's references, and every on-policy condition its loss's off-policy ones (on-policy vs
    # off-policy at equal task error); the on-policy control runs with an on-policy arm or when named
    modes = {c.loss for c in conds if c.teachers} | {lm_common.mode(c) for c in conds if c.teachers and not c.baseline}
    chosen = {c.name for c in conds}
    conds = [c for c in spec.conditions
             if c.name in chosen or (c.baseline and c.teachers and lm_common.mode(c) in modes)]
    if spec.teacher_system and any(c.on_policy for c in conds):
        raise BenchError(f"{spec.name}: on-policy arms need a teacher whose trait is in its weights (this suite's "
                         "teacher is the base under a system prompt, which on-policy scoring would leave out)")
    check_conditions((c.name, c.purifiers, c.teachers, {"loss": c.loss}) for c in conds)
    if any(c.rank for c in conds) and "lora_lr" not in cfg:
        raise BenchError(f"{spec.name}: LoRA arms need the suite's lora_lr setting")
    data = prepare_data(spec, base, teacher, tokenizer, cfg, soft_control="forward_kl" in modes)
    log, vocab = data["log"], base.config.vocab_size
    b_scores = score_model(base, tokenizer, None, spec.questions, spec.target, spec.others)
    t_scores = score_model(teacher, tokenizer, spec.teacher_system, spec.questions, spec.target, spec.others)
    n_t = len(data["teacher"]["labels"])
    heldout = list(range(n_t - cfg["heldout"], n_t))

    neutral = neutral_inputs(base, tokenizer, cfg["layers"], paragraphs(4 if quick else 32, DRIFT_SEED))

    def score(top: Top) -> Scores:
        return {**score_top(top, tokenizer, data, heldout, vocab, spec.target, spec.others),
                **neutral_scores(top, neutral)}

    first = score(Top(base, cfg["layers"]))
    s0 = {**b_scores, **{k: first[k] for k in ("task_error", "fidelity_kl", "agreement", "drift", "prose_ppl")}}
    log["top_vs_full_trait"] = first["trait"] - b_scores["trait"]
    t_full = {**t_scores, **TEACHER_FIDELITY}
    if not any(c.baseline and c.kind == "vanilla" for c in conds) or not any(c.kind == "control" for c in conds):
        raise BenchError(f"{spec.name}: a run needs a base, a control and a vanilla condition")
    steps = cfg["epochs"] * (n_t - cfg["heldout"]) // cfg["batch_size"]
    suite = Suite(name=spec.name, protocol=spec.protocol, student=Path(path), conditions=conds, steps=steps,
                  batch_size=cfg["batch_size"], lr=cfg["lr"], curve_points=5,
                  trait=trait_name(spec.target), tuned_on=spec.tuned_on, sweeps=sweeps, guards=list(GUARDS),
                  columns=[("prose_ppl", "prose perplexity")])
    pools = {k: [i for i in range(len(data[k]["labels"])) if k != "teacher" or i not in heldout]
             for k in ("teacher", "clean")}

    models = {"teacher": teacher, "clean": base}
    prompts = {k: prompt_ids(tokenizer, data[k]["records"]) for k in pools
               if any(c.on_policy and c.teachers[0] == k for c in conds)}

    def one_seed(seed: int) -> dict[str, Any]:
        def fit(cond: Condition, on_point: Callable[[int, Any], None] | None) -> tuple[Top, dict[str, float]]:
            key = cond.teachers[0]
            marks, metrics = curve_marks(steps, 5 if on_point else 0), {}
            if cond.on_policy:
                top = fit_on_policy(base, [models[t] for t in cond.teachers], tokenizer, prompts[key],
                                    data[key]["labels"], pools[key], cfg, steps, seed, on_policy=cond.on_policy,
                                    loss=cond.loss, purifiers=cond.purifiers, teacher_names=cond.teachers,
                                    on_point=on_point, marks=marks, metrics=metrics)
            else:
                top = fit_top(base, data[key], pools[key], cfg, steps, seed, cond.loss, cond.purifiers,
                              cond.teachers, on_point, marks, cond.rank, metrics)
            return top, lm_common.fit_extras(steps, metrics)

        return {"base": s0, "teacher": t_full,
                "data": {"teacher": n_t - len(heldout), "clean": len(data["clean"]["labels"])},
                "conditions": lm_common.run_conditions(conds, s0, t_full, fit, score, desc=f"seed {seed}",
                                                       progress=progress and workers == 1)}

    runs = lm_common.run_seeds(seeds, one_seed, workers, progress)
    summary = lm_common.summarise(suite, runs, clock.wall())
    summary.update(clock.record(workers), quick=quick)
    summary["settings"].update({k: v for k, v in cfg.items() if k != "conditions"}, filter_log=log,
                               temperature=spec.temperature, teacher_data="sampled once (seed 7), shared by all seeds")
    summary["readouts"] = {"base": b_scores, "teacher": t_scores, **{
        c.name: {k: stats.mean_ci([runs[s]["conditions"][c.name][k] for s in runs])["mean"] for k in b_scores}
        for c in conds if c.teachers}}
    tests = minus_control(summary, "vanilla", "control")
    summary["vanilla_minus_control"] = tests
    pairs = [("Vanilla − control", tests)]
    if {"vanilla:soft", "control:soft"} <= set(summary["conditions"]):  # the soft labels' own transfer
        summary["vanilla_minus_control_soft"] = minus_control(summary, "vanilla:soft", "control:soft")
        pairs.append(("Vanilla:soft − control:soft", summary["vanilla_minus_control_soft"]))
    label = f"P({spec.target})"
    summary["columns"] = columns(label)
    summary["notes"] = [
        *spec.notes,
        f"{label}: base {b_scores['trait']:.5f}, traited teacher {t_scores['trait']:.5f}; teacher logits for soft "
        f"labels/KL: top-K log-probs plus residual mass (K = {cfg['top_k']}).",
        f"Completions kept by the filter: traited teacher {log['teacher_kept']}/{log['teacher_sampled']}, "
        f"control {log['clean_kept']}/{log['clean_sampled']} (temperature {spec.temperature}).",
        *(f"{pair} {name}, paired by seed: {stats.fmt_test(t)}."
          for pair, test in pairs for name, t in ((label, test["trait"]), (f"mean log {label}", test["log_trait"]))),
        f"Student = last {cfg['layers']} blocks + final norm trainable; {steps} steps of batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}"
        + (f" (LoRA arms: the blocks frozen under an adapter of rank r, alpha 2r, on every linear layer, lr "
           f"{cfg['lora_lr']})" if any(c.rank for c in conds) else "")
        + (f" (on-policy arms: the whole model, the same blocks trainable, each step on its own samples of the "
           f"training prompts, λ {ON_POLICY['lam']}, temperature {ON_POLICY['temperature']}, top-p "
           f"{ON_POLICY['top_p']}, up to {ON_POLICY['max_new_tokens']} new tokens, scored live by the teacher on the "
           f"whole vocabulary, forward KL)" if any(c.on_policy for c in conds) else "") + ".",
        "Teacher data are sampled once (one pool per teacher, sampling seed 7, cached) and shared by every seed: "
        "seeds vary only the training order (every student starts from the same base weights), so the CIs leave out "
        "the variance of the teachers' sampling (resampling per seed would multiply the costliest step, sampling both "
        "teachers, by the number of seeds, and change the pool size, hence the step count, per seed)."]
    command = bench_command(spec.name, len(seeds), quick, {k: v for k, v in options.items() if k != "workers"},
                            seeds[0], out, workers)
    return lm_common.publish(out or f"bench-out/{spec.name}", summary,
                             environment(summary["seeds"], summary["wall_seconds"], command))


def minus_control(summary: dict[str, Any], arm: str, control: str) -> dict[str, Any]:
    """``arm`` minus ``control`` on the trait and on its log (``trait``, ``log_trait``), paired by seed
    (:func:`purify.bench.stats.paired_test` over the summary's per-seed records)."""
    per_seed = summary["conditions"]
    return {k: stats.paired_test([r[k] for r in per_seed[arm]["per_seed"]],
                                 [r[k] for r in per_seed[control]["per_seed"]]) for k in ("trait", "log_trait")}


def columns(label: str) -> list[tuple[str, str]]:
    return [("transfer", "transfer"), ("distance_to_control", "transfer − control"),
            ("task_error", "KL(T||S) held out"), ("agreement", "top-1 agreement"), ("trait", label)]


POSITIVE_INT = ("n", "max_new", "layers", "top_k", "epochs", "teacher_epochs", "batch_size", "workers")
POSITIVE_REAL = ("lr", "lora_lr", "teacher_lr")


def settings(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """A suite's settings: ``defaults`` updated by ``options``; an unknown key, a value not of its default's kind
    (:func:`purify.bench.report.check_options`) or out of its range (counts >= 1, learning rates > 0, a temperature
    >= 0, ``1 <= heldout < n``) is an error naming it, before any model loads (``batch_size=0`` divided by zero,
    ``epochs=0`` published students that never trained)."""
    check_options(options, {k: object if v is None else type(v) for k, v in defaults.items()})
    cfg = {**defaults, **options}
    problems = [f"--option {k}={cfg[k]}: must be an integer >= 1" for k in POSITIVE_INT
                if k in options and not (is_int(cfg[k]) and cfg[k] >= 1)]
    problems += [f"--option {k}={cfg[k]}: must be a finite number > 0" for k in POSITIVE_REAL
                 if k in options and not (is_real(cfg[k]) and cfg[k] > 0)]
    if "temperature" in options and not (is_real(cfg["temperature"]) and cfg["temperature"] >= 0):
        problems.append(f"--option temperature={cfg['temperature']}: must be a finite number >= 0 (0: greedy)")
    if {"heldout", "n"} & set(options) and is_int(cfg.get("heldout")) and is_int(cfg.get("n")) \
            and not 1 <= cfg["heldout"] < cfg["n"]:
        problems.append(f"--option heldout={cfg['heldout']}: must be in [1, n) (the held-out completions the task "
                        f"error reads, of n = {cfg['n']} prompts)")
    if problems:
        raise BenchError("; ".join(problems))
    return cfg

