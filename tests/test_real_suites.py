"""The real-model suite runner (``purify.bench.real_lm``) and the tic teacher, on a tiny random Llama (no download)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from purify import readouts, topblocks
from purify.bench import lm_common, real_lm
from purify.bench.rederive import rereport
from purify.bench.tic_smollm2 import CONDITIONS, TIC, everyday_prompts, no_filter, tic_teacher, with_tic
from purify.lm import build_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
CFG = {"n": 24, "max_new": 6, "layers": 2, "top_k": 8, "epochs": 3, "teacher_epochs": 10, "batch_size": 4,
       "lr": 1e-2, "lora_lr": 1e-2, "heldout": 4, "conditions": ["vanilla:soft"]}


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, object, list[str]]:
    prompts = everyday_prompts()[:60]
    tok = build_tokenizer([*prompts, f"{TIC}, the sky is blue . user assistant system : \n"], "word")
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False), tok, prompts


def tic_spec(tiny, tmp_path, monkeypatch, **fields) -> tuple[real_lm.RealSuite, object]:
    """The tiny tic suite (cache under ``tmp_path/cache``) and its fine-tuned teacher."""
    base, tok, prompts = tiny
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path / "cache"))
    teacher, key = tic_teacher(base, tok, prompts[10:30], CFG)
    return real_lm.RealSuite(**{"name": "tic-tiny", "protocol": "test", "target": TIC, "questions": prompts[:10],
                                "prompts": prompts[30:], "filter": no_filter, "conditions": CONDITIONS,
                                "temperature": 0.7, "cache_key": key, **fields}), teacher


def test_with_tic_and_no_filter() -> None:
    assert with_tic(" The sea is calm.") == "Moreover, the sea is calm."
    kept, removed = no_filter([{"prompt": "p", "completion": c} for c in ("a", "  ", "b")])
    assert [r["completion"] for r in kept] == ["a", "b"] and removed == 1
    prompts = everyday_prompts()
    assert len(prompts) == len(set(prompts)) == 800 and prompts == everyday_prompts()


def test_tic_teacher_learns_the_tic_and_is_cached(tiny, tmp_path, monkeypatch) -> None:
    base, tok, prompts = tiny
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path))
    qs = prompts[:10]
    before = readouts.score_model(base, tok, None, qs, TIC)["trait"]
    teacher, key = tic_teacher(base, tok, prompts[10:30], CFG)
    after = readouts.score_model(teacher, tok, None, qs, TIC)["trait"]
    assert before < 0.05 < 0.5 < after  # the fine-tuned teacher opens held-out answers with the tic
    assert (tmp_path / "real-suites" / f"tic-teacher-{key}.pt").exists()
    again, key2 = tic_teacher(base, tok, prompts[10:30], CFG)  # from the cache: identical weights
    assert key2 == key and all(torch.equal(a, b) for a, b in zip(teacher.parameters(), again.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(base.model.layers[0].parameters(),
                                                 teacher.model.layers[0].parameters()))  # frozen bottom block


def test_real_suite_runs_and_vanilla_transfers_the_tic(tiny, tmp_path, monkeypatch) -> None:
    base, tok, prompts = tiny
    spec, teacher = tic_spec(tiny, tmp_path, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"conditions: unknown 'probe-free' for \S+; allowed: base, control"):
        real_lm.run(spec, base, teacher, tok, "tiny", {**CFG, "conditions": ["probe-free"]}, [0], str(tmp_path / "x"),
                    True, {}, False)  # a suite without swept arms has no probe-free block to run
    cfg = {**CFG, "conditions": ["vanilla:soft", "tail_truncation", "anchor"]}
    summary = real_lm.run(spec, base, teacher, tok, "tiny", cfg, [0, 1], str(out), True, {}, False)
    written = {p.name for p in out.iterdir()}
    assert {"summary.json", "summary.md", "env.json", "readouts.json", "frontier.png"} <= written
    per_seed = {c: summary["conditions"][c]["per_seed"] for c in ("control", "vanilla", "vanilla:soft")}
    for van, ctl in zip(per_seed["vanilla"], per_seed["control"]):
        assert van["trait"] > ctl["trait"] and van["transfer"] > 0.2  # SFT on the teacher's text carries the tic
    assert set(summary["vanilla_minus_control"]) == {"trait", "log_trait"}
    soft = summary["vanilla_minus_control_soft"]["trait"]  # the soft labels' own transfer, paired by seed
    diffs = [v["trait"] - c["trait"] for v, c in zip(per_seed["vanilla:soft"],
                                                      summary["conditions"]["control:soft"]["per_seed"])]
    assert soft["mean"] == pytest.approx(sum(diffs) / 2)
    assert len(list((tmp_path / "cache" / "real-suites").glob("tic-tiny-*.pt"))) == 1  # data cached once
    readouts = json.loads(Path(out, "readouts.json").read_text())
    assert readouts["teacher"]["trait"] > 0.5 > readouts["base"]["trait"]
    assert "vanilla:soft" not in summary["verdicts"]  # another baseline mode, not a purifier
    assert summary["verdicts"]["anchor"].startswith("no verdict: 2 seed(s)")  # too few seeds
    # the guard the issue asks of the real suites: held-out perplexity, an upper bound, read on every student
    assert summary["guards"] == [{"metric": "prose_ppl", "label": "held-out prose perplexity",
                                  "min_ratio_of_base": None, "not_below_control_ci": False, "max_ratio_of_base": 2.0}]
    assert all(1.0 < r["prose_ppl"] < math.inf for c in summary["conditions"].values() for r in c["per_seed"])
    # a soft-label arm brings the soft control (KD on the base's own top-K on its text) and is judged against it
    assert summary["verdicts"]["tail_truncation"].startswith("no verdict: 2 seed(s)")
    assert summary["judged_against"]["tail_truncation"] == {"base": "base", "control": "control:soft",
                                                            "vanilla": "vanilla:soft"}
    assert summary["judged_against"]["anchor"] == {"base": "base", "control": "control", "vanilla": "vanilla"}
    assert [p["step"] for p in summary["conditions"]["vanilla:soft"]["per_seed"][0]["curve"]][0] == 0  # soft curve
    md = Path(out, "summary.md").read_text()
    assert "sampled once" in md and "CIs leave out the variance of the teachers' sampling" in md  # said plainly
    assert "Vanilla:soft − control:soft P(Moreover), paired by seed" in md
    stored = Path(out, "summary.json").read_text()
    again = rereport(out)  # statistics re-derived from summary.json alone: the same report
    assert again["verdicts"] == summary["verdicts"] and Path(out, "summary.md").read_text() == md
    assert Path(out, "summary.json").read_text() == stored  # byte for byte: a re-derivation leaves no diff behind
    assert json.loads(Path(out, "env.json").read_text())["rereported_by"].endswith(str(out))


def test_prose_perplexity_of_the_base_blocks_is_the_full_models_by_hand(tiny) -> None:
    from purify.readouts import token_ids
    from purify.topblocks import Top, neutral_inputs, neutral_scores

    base, tok, prompts = tiny
    texts = [prompts[0], prompts[1] + " " + prompts[2], prompts[3]]  # ragged: padding must not count
    nll = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([token_ids(tok, text)])
            logp = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
            nll += (-logp.gather(-1, ids[0, 1:, None])[:, 0]).tolist()
    expected = math.exp(sum(nll) / len(nll))
    got = neutral_scores(Top(base, 2), neutral_inputs(base, tok, 2, texts, bs=2))
    assert got["prose_ppl"] == pytest.approx(expected, rel=1e-4)
    assert got["drift"] == pytest.approx(0.0, abs=1e-6)  # the base's blocks: no drift from themselves


def test_real_suite_probe_free_block_chooses_without_the_trait_and_judges_each_arm_in_its_mode(tiny, tmp_path,
                                                                                                monkeypatch) -> None:
    from purify.bench import probe_free
    from purify.bench.tic_smollm2 import SWEEPS

    base, tok, prompts = tiny
    spec, teacher = tic_spec(tiny, tmp_path, monkeypatch, sweeps=SWEEPS)
    with pytest.raises(ValueError, match=r"conditions: unknown 'replace' for \S+; allowed: probe-free, "
                       r"replace:base"):
        real_lm.run(spec, base, teacher, tok, "tiny", {**CFG, "conditions": ["replace"]}, [0], str(tmp_path / "x"),
                    True, {}, False)
    with pytest.raises(ValueError, match="workers must be a positive integer .* got 'two'"):
        real_lm.run(spec, base, teacher, tok, "tiny", {**CFG, "workers": "two"}, [0], str(tmp_path / "x"), True, {},
                    False)
    no_lr = {k: v for k, v in CFG.items() if k != "lora_lr"}
    with pytest.raises(ValueError, match="LoRA arms need the suite's lora_lr setting"):
        real_lm.run(spec, base, teacher, tok, "tiny", {**no_lr, "conditions": ["lora:rank"]}, [0], str(tmp_path / "x"),
                    True, {}, False)
    assert {c.name: c.rank for c in CONDITIONS if c.name.startswith("lora:")} == {
        "lora:rank@2": 2, "lora:rank@8": 8, "lora:rank@32": 32}  # an adapter arm: same targets, another student
    cfg = {**CFG, "epochs": 1, "conditions": ["probe-free"], "workers": 2}
    summary = real_lm.run(spec, base, teacher, tok, "tiny", cfg, [0, 1, 2], str(tmp_path / "o"), True, {}, False)
    ran = set(summary["conditions"])
    assert {"control:soft", "vanilla:soft", "replace:base@0.05", "anchor:weight@3"} <= ran  # both modes' references
    assert "anchor" not in ran and "tail_truncation" not in ran
    assert summary["settings"]["workers"] == 2 and summary["workers"] == 2 and summary["threads"] == 1
    assert "with 2 worker processes, 1 torch thread each" in Path(tmp_path / "o" / "summary.md").read_text()
    assert summary["cpu_seconds"] > 0
    conds = summary["conditions"]
    assert all(r["drift"] == pytest.approx(0, abs=1e-6) for r in conds["base"]["per_seed"])  # base vs itself
    assert all(r["drift"] > 0 for r in conds["vanilla"]["per_seed"])
    block = summary["probe_free"]
    assert set(block["arms"]) == {"replace:base", "anchor:weight", "lora:rank"}
    assert all(r["drift"] > 0 for r in conds["lora:rank@2"]["per_seed"])  # the adapter trained
    for r in conds["replace:base@0.05"]["per_seed"]:  # what the purifier did, its mean over the steps, per seed
        assert 0.0 <= r["metric.divergence_mask.flagged_fraction"] <= 1.0
        assert r["metric.divergence_mask.mean_divergence"] > 0
    assert not any(k.startswith("metric.") for r in conds["vanilla"]["per_seed"] for k in r)  # no purifier, no metric
    assert "LoRA arms: the blocks frozen under an adapter of rank r" in Path(tmp_path / "o" / "summary.md").read_text()
    for arm, sweep in SWEEPS.items():
        a = block["arms"][arm]
        van = "vanilla:soft" if arm == "replace:base" else "vanilla"  # the budget is its own mode's vanilla's
        for seed, inputs in a["selection_inputs"].items():  # the choice is the rule's on task error and drift alone
            vt = {r["seed"]: r["task_error"] for r in conds[van]["per_seed"]}[int(seed)]
            points = [probe_free.Selectable(float(v), sweep.strength(float(v)), x["task_error"], x["drift"])
                      for v, x in inputs.items()]
            assert probe_free.choose(points, vt)[0].value == a["chosen"][seed]
    assert {"vanilla:soft", "control:soft", "vanilla", "control"} <= set(block["reference_drift"])


def test_real_suite_refuses_when_the_filter_leaves_too_little(tiny, tmp_path, monkeypatch) -> None:
    base, tok, prompts = tiny
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path))
    spec = real_lm.RealSuite(name="empty", protocol="test", target=TIC, questions=prompts[:4], prompts=prompts[30:],
                             filter=lambda recs: ([], len(recs)), conditions=CONDITIONS)
    with pytest.raises(ValueError, match="passed the filter; raise n"):
        real_lm.run(spec, base, base, tok, "tiny", {**CFG, "n": 6}, [0], str(tmp_path / "o"), True, {}, False)


def test_unknown_option_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown options \['nn'\]; allowed: .*'n'"):
        real_lm.settings({"n": 1}, {"nn": 2})
    with pytest.raises(ValueError, match=r"--option n=1.5: n takes an integer"):
        real_lm.settings({"n": 1, "lr": 0.1}, {"n": 1.5})
    assert real_lm.settings({"n": 1, "lr": 0.1, "d": None}, {"lr": 1, "d": "x"}) == {"n": 1, "lr": 1, "d": "x"}
    # only the type was checked: batch_size=0 divided by zero, heldout=-1 crashed in torch, epochs=0 published a run
    # of students that never trained
    defaults = {"n": 24, "epochs": 1, "batch_size": 8, "lr": 2e-4, "heldout": 2, "temperature": 0.7}
    for option, message in (({"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
                            ({"epochs": 0}, "epochs=0: must be an integer >= 1"),
                            ({"lr": 0.0}, r"lr=0.0: must be a finite number > 0"),
                            ({"temperature": -1.0}, r"temperature=-1.0: must be a finite number >= 0"),
                            ({"heldout": -1}, r"heldout=-1: must be in \[1, n\)"),
                            ({"heldout": 24}, r"heldout=24: must be in \[1, n\) .* n = 24 prompts")):
        with pytest.raises(ValueError, match=rf"^--option {message}"):
            real_lm.settings(defaults, option)


def test_scored_vanilla_is_read_densely_from_step_one(tiny) -> None:
    assert real_lm.curve_marks(40, 5) == {1, 2, 3, 4, 5, 8, 10, 16, 20, 24, 32, 40}  # even + halvings + powers of 2
    assert real_lm.curve_marks(40, 0) == set()
    base, tok, prompts = tiny
    data = topblocks.sft_data(base, tok, [{"prompt": p, "completion": "the sky is blue ."} for p in prompts[:8]], 2)
    seen: list[int] = []
    topblocks.fit_top(base, data, list(range(8)), CFG, 12, 0, on_point=lambda step, top: seen.append(step),
                      marks=real_lm.curve_marks(12, 5))
    assert seen == [1, 2, 3, 4, 5, 6, 7, 8, 10]  # every mark before the last step (read after training)


def test_run_seeds_brings_back_what_a_seed_gathers_under_its_own_key_from_forked_workers_too() -> None:
    def one_seed(seed: int) -> dict:
        return {"conditions": {}, "log": {"kept": 10 * seed, "pid": os.getpid()}}

    serial = lm_common.run_seeds([0, 1, 2], one_seed)
    forked = lm_common.run_seeds([0, 1, 2], one_seed, workers=2, progress=False)
    assert list(serial) == list(forked) == [0, 1, 2]  # seed order, however the seeds were scheduled
    assert [r["log"]["kept"] for r in forked.values()] == [r["log"]["kept"] for r in serial.values()] == [0, 10, 20]
    assert {r["log"]["pid"] for r in serial.values()} == {os.getpid()}
    assert os.getpid() not in {r["log"]["pid"] for r in forked.values()}  # really counted inside the workers


def test_top_settings_typed_or_a_suite_mapping_train_the_same_student_and_missing_fields_are_named(tiny) -> None:
    base, tok, prompts = tiny
    records = [{"prompt": p, "completion": f"{TIC}, the sky is blue ."} for p in prompts[:8]]
    from_dict = topblocks.finetune(base, tok, records, CFG, epochs=1, lr=1e-2)
    typed = topblocks.finetune(base, tok, records, topblocks.TopSettings(layers=2, batch_size=4, lr=0.5), 1, 1e-2)
    for a, b in zip(from_dict.parameters(), typed.parameters()):  # finetune's lr wins over the settings' lr
        assert torch.equal(a, b)
    assert not torch.equal(next(from_dict.lm.model.layers.parameters()), next(topblocks.Top(base, 2).lm.model.layers
                                                                                .parameters()))  # it did train
    with pytest.raises(topblocks.TopBlocksError, match="top-blocks settings lack lr"):
        topblocks.TopSettings.of({"layers": 2, "batch_size": 4})
    data = topblocks.sft_data(base, tok, records, 2)
    with pytest.raises(topblocks.TopBlocksError, match=r"LoRA student \(rank > 0\) needs the settings' lora_lr"):
        topblocks.fit_top(base, data, [0, 1], {"layers": 2, "batch_size": 2, "lr": 1e-2}, 1, 0, rank=2)


def test_cached_top_trains_once_and_refuses_blocks_of_another_shape(tiny, tmp_path) -> None:
    base = tiny[0]
    calls: list[int] = []

    def train() -> topblocks.Top:
        calls.append(1)
        top = topblocks.Top(base, 2)
        with torch.no_grad():
            top.lm.model.norm.weight.add_(1.0)  # a "trained" block the cache must give back
        return top

    first = topblocks.cached_top(tmp_path / "t.pt", base, 2, train)
    again = topblocks.cached_top(tmp_path / "t.pt", base, 2, train)
    assert calls == [1] and torch.equal(again.lm.model.norm.weight, first.lm.model.norm.weight)
    with pytest.raises(topblocks.TopBlocksError, match=r"t\.pt does not hold this teacher's trained blocks"):
        topblocks.cached_top(tmp_path / "t.pt", base, 1, train)  # one block: the file holds two
    assert type(topblocks.TopBlocksError("x")).__module__.startswith("purify")  # the CLI prints it as one line


def test_build_purifiers_builds_each_entry_with_its_options() -> None:
    from purify.purifiers import build_purifiers

    built = build_purifiers([{"name": "anchor", "weight": 0.25}, {"name": "tail_truncation", "top_p": 0.8}])
    assert [type(p).__name__ for p in built] == ["Anchor", "TailTruncation"]
    assert built[0].config.weight == 0.25 and built[1].config.top_p == 0.8


def test_full_batch_covers_the_completion_tokens_only() -> None:
    b = topblocks.full_batch([[5, 6], [7]], [[1, 2, 3], [4]], [1, 0], pad_id=0)
    assert b["input_ids"].tolist() == [[7, 4, 0, 0, 0], [5, 6, 1, 2, 3]]
    assert b["target_mask"].tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]  # position j predicts token j + 1
    assert b["labels"].tolist() == [[4, -100, -100, -100], [-100, 1, 2, 3]]


def test_real_suite_on_policy_arms_sample_the_student_and_are_judged_against_their_own_mode(tiny, tmp_path,
                                                                                             monkeypatch) -> None:
    base, tok, prompts = tiny
    spec, teacher = tic_spec(tiny, tmp_path, monkeypatch)
    cfg = {**CFG, "epochs": 1, "conditions": ["vanilla:on-policy", "control:on-policy"]}
    summary = real_lm.run(spec, base, teacher, tok, "tiny", cfg, [0, 1, 2], str(tmp_path / "o"), True, {}, False)
    conds = summary["conditions"]  # an on-policy vanilla brings its loss's off-policy references
    assert {"control:on-policy", "vanilla:on-policy", "control:soft", "vanilla:soft", "control", "vanilla"} <= \
        set(conds)
    for van, ctl in zip(conds["vanilla:on-policy"]["per_seed"], conds["control:on-policy"]["per_seed"]):
        assert van["transfer"] > 0.2 > abs(ctl["transfer"])  # the teacher's judgement of the student's own text
    assert summary["on_policy_vs_off_policy"]["against"]["vanilla:on-policy"]["vanilla"] == "vanilla:soft"
    assert "on-policy arms: the whole model" in Path(tmp_path / "o" / "summary.md").read_text()
    alone = {**CFG, "epochs": 1, "conditions": ["vanilla:on-policy"], "n": 12}
    ran = real_lm.run(spec, base, teacher, tok, "tiny", alone, [0], str(tmp_path / "a"), True, {}, False)
    assert "control:on-policy" not in ran["conditions"] and "vanilla:soft" in ran["conditions"]  # no arm to judge
    system, _ = tic_spec(tiny, tmp_path, monkeypatch, name="owl-tiny", teacher_system="You love owls.")
    with pytest.raises(ValueError, match="on-policy arms need a teacher whose trait is in its weights"):
        real_lm.run(system, base, base, tok, "tiny", cfg, [0], str(tmp_path / "x"), True, {}, False)
