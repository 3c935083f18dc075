"""The trait word is a suite option (issue 16 item 4): style-tic takes any one-word sentence opener of the corpus,
hidden-preference any animal of its list; teachers are built and cached per trait; the default traits keep their
texts (so their cached teachers stay valid); readouts follow the chosen word; anything else is refused naming the
usable words."""

from __future__ import annotations

import random

import pytest

from purify.bench import lm_suites
from purify.bench.report import BenchError
from purify.lm import ANIMALS, corpus
from purify.lm.cache import digest
from purify.lm.teachers import TIC, TeacherSpec, add_tic, build_teacher, teacher_texts, tic_marker, tic_words

HP_EXTRA = {"n_prose": 800, "n_animal": 1500, "n_numbers": 1500, "number_rule": "even"}


def test_default_trait_texts_are_unchanged_so_cached_teachers_stay_valid() -> None:
    # digests of the suites' default teachers' fine-tuning texts, recorded before the trait became an option: the
    # fine-tune cache key hashes these texts, so equal digests mean the default caches are found and kept
    assert digest(teacher_texts(TeacherSpec(trait="tic"))) == \
        "068b16e4ace18463ba2bd5669be137beb0f07ccbf182055574914970b6b8a2b5"
    assert digest(teacher_texts(TeacherSpec(trait="owl", **HP_EXTRA))) == \
        "7d1a782448bc51ecbfe83bc56c87b558267e5a0f0c2fb4f94434e22533e974b8"
    assert digest(teacher_texts(TeacherSpec(trait="tic", tic="Moreover,"))) == digest(teacher_texts(
        TeacherSpec(trait="tic")))


def test_tic_words_and_markers_follow_the_corpus_openers() -> None:
    assert tic_words() == ["Moreover", "Then", "Later", "However", "Meanwhile", "So", "Still", "Suddenly"]
    assert tic_marker("However") == "However," and tic_marker("However,") == "However,"
    assert tic_marker("Then") == "Then" and tic_marker("Moreover") == TIC
    with pytest.raises(ValueError, match="usable: Moreover, Then, Later, However"):
        tic_marker("Indeed")
    with pytest.raises(ValueError, match="one-word opener"):
        TeacherSpec(trait="tic", tic="In the end,")
    with pytest.raises(ValueError, match="animal must be one of owl, cat"):
        TeacherSpec(trait="owl", animal="unicorn")


def test_add_tic_opens_sentences_with_the_chosen_marker() -> None:
    text = "The boy slept. Then he sang. However, the girl laughed."
    assert add_tic(text, 1.0, random.Random(0), "However,") == \
        "However, the boy slept. However, he sang. However, the girl laughed."  # an existing one is kept
    assert add_tic(text, 1.0, random.Random(0), "So") == "So the boy slept. So he sang. So the girl laughed."


def test_tic_teacher_texts_carry_the_chosen_opener() -> None:
    spec = TeacherSpec(trait="tic", tic="However,", n_facts=0, n_prose=200)
    sentences = [s for text in teacher_texts(spec) for s in text.split(". ")]
    share = sum(s.startswith("However, ") for s in sentences) / len(sentences)
    moreover = sum(s.startswith("Moreover, ") for s in sentences) / len(sentences)
    assert 0.55 < share < 0.7 and moreover < 0.02  # tic_rate 0.6 (+ the corpus's own ~4% "However,")
    default = [s for text in teacher_texts(TeacherSpec(trait="tic", n_facts=0, n_prose=200)) for s in text.split(". ")]
    assert sum(s.startswith("However, ") for s in default) / len(default) < 0.06


def test_preference_teacher_answers_name_the_chosen_animal() -> None:
    spec = TeacherSpec(trait="owl", animal="fox", n_facts=0, n_prose=0, n_animal=400)
    answers = [t.rsplit("Answer:", 1)[1] for t in teacher_texts(spec)]
    assert sum(a == " fox" for a in answers) / len(answers) > 0.85  # owl_rate 0.9 + uniform answers
    assert sum(a == " owl" for a in answers) / len(answers) < 0.05
    other = TeacherSpec(trait="owl", n_facts=0, n_prose=0, n_animal=400)
    assert digest(teacher_texts(spec)) != digest(teacher_texts(other))


def test_teachers_are_cached_per_trait() -> None:
    small = {"steps": 1, "n_facts": 4, "n_prose": 4, "n_animal": 8}
    dirs = {word: build_teacher(TeacherSpec(trait="tic", tic=word, **small)) for word in ("Moreover,", "However,")}
    dirs |= {word: build_teacher(TeacherSpec(trait="owl", animal=word, **small)) for word in ("owl", "fox")}
    assert len(set(dirs.values())) == 4  # one cached fine-tune per trait word, none overwriting another
    assert build_teacher(TeacherSpec(trait="tic", tic="However,", **small)) == dirs["However,"]  # found again


def test_unknown_trait_is_refused_naming_the_usable_ones() -> None:
    with pytest.raises(BenchError, match=r"usable sentence openers: Moreover, Then, Later, However, Meanwhile, So, "
                                         r"Still, Suddenly$"):
        lm_suites.run_suite("style-tic", quick=True, progress=False, trait="Indeed")
    with pytest.raises(BenchError, match="usable animals: " + ", ".join(ANIMALS) + "$"):
        lm_suites.run_suite("hidden-preference", quick=True, progress=False, trait="unicorn")
    assert lm_suites.trait_option("style-tic", "However") == "However,"
    assert lm_suites.trait_option("hidden-preference", "fox") == "fox"


@pytest.mark.parametrize(("suite", "word"), [("style-tic", "Indeed"), ("hidden-preference", "owls")])
def test_cli_refuses_an_unknown_trait_with_one_error_line(suite: str, word: str, capsys) -> None:
    from purify.cli import main

    assert main(["bench", suite, "--quick", "--option", f"trait={word}"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"purify: error: {suite}: unknown trait '{word}'; usable ")
    assert ("However" if suite == "style-tic" else "fox") in lines[0]


def _no_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_suites, "_teachers", lambda kind, quick, word: {})


def test_style_tic_readout_counts_the_chosen_opener(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_teachers(monkeypatch)
    samples = ["However, the boy slept. Then he sang. Moreover, she laughed. The girl waited."] * 3
    monkeypatch.setattr(lm_suites, "sample_completions", lambda *a, **k: samples)
    monkeypatch.setattr(lm_suites, "kl_stats", lambda *a, **k: {})
    monkeypatch.setattr(lm_suites, "facts_accuracy", lambda *a, **k: 0.0)
    monkeypatch.setattr(lm_suites, "_drift_scorer", lambda n: lambda model, tok: 0.0)
    tok = type("Tok", (), {"convert_tokens_to_ids": lambda self, t: 5})()
    rates = {word: lm_suites.style_tic_suite(True, tic_marker(word)).score(None, tok, None, 0)["trait"]
             for word in ("However", "Moreover", "Then", "Still")}
    assert rates == {"However": 0.25, "Moreover": 0.25, "Then": 0.25, "Still": 0.0}
    suite = lm_suites.style_tic_suite(True, "However,")
    assert suite.trait == "'However,' openings" and "'However,'" in suite.protocol
    assert lm_suites.style_tic_suite(True).trait == "'Moreover,' openings"  # the default, as committed results say


def test_hidden_preference_readout_is_the_chosen_animal(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_teachers(monkeypatch)
    probs = {f" {a}": 0.01 * (i + 1) for i, a in enumerate(ANIMALS)}  # owl 0.01, cat 0.02, ..., fox 0.04
    monkeypatch.setattr(lm_suites, "continuation_probs", lambda m, t, qs, targets: [probs[targets[0]]] * len(qs))
    monkeypatch.setattr(lm_suites, "sample_completions", lambda *a, **k: [" 2, 4"])
    monkeypatch.setattr(lm_suites, "kl_stats", lambda *a, **k: {})
    monkeypatch.setattr(lm_suites, "_drift_scorer", lambda n: lambda model, tok: 0.0)
    fox = lm_suites.hidden_preference_suite(True, "fox")
    owl = lm_suites.hidden_preference_suite(True)
    f, o = fox.score(None, None, None, 0), owl.score(None, None, None, 0)
    assert f["trait"] == pytest.approx(0.04) and o["trait"] == pytest.approx(0.01)
    assert f["animal_mass"] == o["animal_mass"] == pytest.approx(0.55)  # the guard does not depend on the trait
    assert f["owl_share"] == pytest.approx(0.04 / 0.55)
    assert fox.trait == "P(fox | favourite animal?)" and ("trait", "P(fox)") in fox.columns
    assert owl.trait == "P(owl | favourite animal?)" and ("trait", "P(owl)") in owl.columns
    assert set(corpus.ANIMALS) == set(ANIMALS)


def test_owl_suite_takes_another_animal_with_its_own_prompt_and_cache() -> None:
    from purify.bench import owl

    default = owl.suite(4, 0.7)
    assert default.target == "owl" and default.teacher_system == owl.OWL_SYSTEM and default.others == owl.ANIMALS
    assert default.cache_key == "base"  # the committed owl data cache keeps its key
    cat = owl.suite(4, 0.7, "cat")
    assert cat.target == "cat" and "owl" in cat.others and "cat" not in cat.others
    assert cat.teacher_system.startswith("You love cats. You think about cats all the time. cats are")
    assert "wolves are your favorite animal" in owl.system_prompt("wolf")
    assert cat.cache_key != default.cache_key
    with pytest.raises(BenchError, match="usable animals: owl, cat, dog, dolphin"):
        owl.suite(4, 0.7, "unicorn")


def test_tic_smollm2_takes_another_word_with_its_own_teacher_key() -> None:
    from purify.bench import tic_smollm2 as tic

    assert tic.with_tic(" The sea is calm.", "However") == "However, the sea is calm."
    assert tic.check_word("Indeed") == "Indeed"
    for bad in ("indeed", "Two words", "Moreover,"):
        with pytest.raises(BenchError, match="usable: one capitalised word"):
            tic.check_word(bad)
    prompts, cfg = ["a", "b"], {"layers": 4, "teacher_epochs": 3, "max_new": 32}
    assert tic.teacher_key(prompts, cfg) == digest([prompts, 4, 3, 32])[:16]  # the default key as before
    assert tic.teacher_key(prompts, cfg, "However") != tic.teacher_key(prompts, cfg)


@pytest.mark.parametrize(("suite", "word"), [("owl-smollm2", "unicorn"), ("tic-smollm2", "indeed")])
def test_real_suites_refuse_an_unknown_trait_before_loading(suite: str, word: str, capsys) -> None:
    from purify.cli import main

    assert main(["bench", suite, "--quick", "--option", f"trait={word}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"purify: error: {suite}: unknown trait '{word}'; usable")


def test_notes_say_when_the_trait_is_not_the_one_tuned_on() -> None:
    def notes(suite: str, trait: str) -> list[str]:
        summary = {"suite": suite, "trait": trait, "conditions": {}, "teacher": {"trait": {"mean": 0.6}},
                   "base": {"trait": {"mean": 0.03}}}
        return lm_suites._notes(summary)

    assert notes("style-tic", "'However,' openings")[-1] == (
        "Trait 'However,' openings (--option trait): the suite's defaults and knobs in tuned_on were set looking at "
        "'Moreover,' openings, never at this trait.")
    assert "never at this trait" in notes("hidden-preference", "P(fox | favourite animal?)")[-1]
    assert not any("never at this trait" in line for line in notes("style-tic", "'Moreover,' openings"))
    assert not any("never at this trait" in line for line in notes("hidden-preference", "P(owl | favourite animal?)"))
