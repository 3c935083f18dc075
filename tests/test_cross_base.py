"""Cross-base teachers: alignment functions on hand examples, the cross_base purifier, and end-to-end training of a
word-level student from a character-level teacher (two different tokenizers of the same text, built in memory)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from purify.align import VocabMap, align_positions, map_logprobs, target_positions, uld_loss, vocab_map
from purify.config import RecipeError
from purify.assembly import load_recipe
from purify.data import TeacherTokenizer, TokenDataset, read_text
from purify.lineage import read_lineage
from purify.lm import build_tokenizer
from purify.module import Distiller
from purify.purifiers.cross_base import CrossBase, CrossBaseConfig
from purify.purifiers.ensemble import Ensemble, EnsembleConfig
from purify.assembly import build_run
from purify.train import train

HAND_TEXT = "the cat sat. 12"
# word tokens: <bos> ▁the ▁cat ▁sat . ▁ 1 2 <eos>; char tokens: <bos> t h e ␣ c a t ␣ s a t . ␣ 1 2 <eos>
WORD_SPANS = [(0, 0), (0, 3), (3, 7), (7, 11), (11, 12), (12, 13), (13, 14), (14, 15), (15, 15)]
CHAR_SPANS = [(0, 0)] + [(i, i + 1) for i in range(15)] + [(15, 15)]



@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [r["completion"] for r in read_text(None)[:40]]


@pytest.fixture(scope="module")
def toks(texts):
    return build_tokenizer(texts, "word"), build_tokenizer(texts, "char")


def llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))


def gpt2(tok, seed: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, texts, toks):
    """A word tokenizer directory, a char-level GPT-2 teacher directory and a text file, for recipes."""
    root = tmp_path_factory.mktemp("cross")
    word, char = toks
    word.save_pretrained(root / "word")
    teacher = gpt2(char)
    teacher.save_pretrained(root / "char")
    char.save_pretrained(root / "char")
    (root / "data.txt").write_text("\n".join(texts))
    return root


def lm_overrides(root, out, **extra: object) -> list[str]:
    student = ("{config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
               "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}, "
               f"tokenizer: {root}/word}}")
    items = {"student": student, "teachers": f"[{{path: {root}/char, name: cross}}]",
             "purifiers": "[{name: cross_base}]", "data.train": f"{root}/data.txt", "data.max_length": 16,
             "data.batch_size": 4, "trainer.max_steps": 3, "trainer.val_check_interval": 3,
             "trainer.limit_val_batches": 1, "trainer.checkpoint_every_n_steps": 3, "trainer.log_every_n_steps": 1,
             "trainer.enable_progress_bar": False, "export": False, "output_dir": str(out)}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def cross_batch(toks, texts, n: int = 4) -> dict:
    word, char = toks
    ds = TokenDataset([{"prompt": "", "completion": t} for t in texts[:n]], word, 16,
                      {1: TeacherTokenizer(char, 128)})
    batch = ds.collate([ds.item(i) for i in range(len(ds))])
    batch["teacher_batches"][0] = batch["teacher_batches"].pop(1)  # the char teacher as teachers[0]
    return batch


# ------------------------------------------------------------------ alignment functions
def test_align_positions_pairs_tokens_with_the_same_span_on_a_hand_example(toks):
    word, char = toks
    enc = [tok(HAND_TEXT, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"] for tok in toks]
    assert [(0, 0), *enc[0], (15, 15)] == WORD_SPANS and [(0, 0), *enc[1], (15, 15)] == CHAR_SPANS
    # ".", "▁" (the space before a digit), "1", "2", <eos> and <bos> cover exactly one char token; words do not
    assert align_positions(WORD_SPANS, CHAR_SPANS).tolist() == [0, -1, -1, -1, 12, 13, 14, 15, 16]
    padded = torch.tensor([WORD_SPANS + [(-1, -1)]])
    # next-token positions: student position p (predicting token p+1) takes teacher position j-1
    assert target_positions(padded, torch.tensor([CHAR_SPANS])).tolist() == [[-1, -1, -1, 11, 12, 13, 14, 15, -1]]


def test_identical_tokenizations_align_as_the_identity(toks):
    word, _ = toks
    assert align_positions(WORD_SPANS, WORD_SPANS).tolist() == list(range(len(WORD_SPANS)))
    vmap = vocab_map(word, word)
    assert vmap.index.tolist() == list(range(len(word))) and vmap.coverage == 1.0
    logits = torch.randn(2, 3, len(word))
    logq, mass = map_logprobs(logits, vmap, len(word))
    torch.testing.assert_close(logq, F.log_softmax(logits, -1))
    torch.testing.assert_close(mass, torch.ones(2, 3))


def test_vocab_map_matches_surface_strings_and_coverage_is_counted_by_hand():
    word, char = build_tokenizer([HAND_TEXT], "word"), build_tokenizer([HAND_TEXT], "char")
    vmap = vocab_map(word, char)
    pairs = {char.convert_ids_to_tokens(t): word.convert_ids_to_tokens(int(s)) for t, s in enumerate(vmap.index)
             if s >= 0}
    specials = {x: x for x in ("<pad>", "<unk>", "<bos>", "<eos>")}
    # the char " " is the word tokenizer's bare "▁" (surface text " "); letters have no one-char word
    assert pairs == {" ": "▁", ".": ".", "1": "1", "2": "2", **specials}
    assert len(char) == 14 and vmap.coverage == pytest.approx(8 / 14)


def test_map_logprobs_renormalises_over_matched_tokens_and_reports_their_mass():
    vmap = VocabMap(index=torch.tensor([2, -1, 0, 2]))  # teacher tokens 0 and 3 both map to student token 2
    logq, mass = map_logprobs(torch.tensor([0.4, 0.3, 0.2, 0.1]).log(), vmap, student_vocab=3)
    torch.testing.assert_close(logq.exp(), torch.tensor([0.2 / 0.7, 0.0, 0.5 / 0.7]))
    assert float(mass) == pytest.approx(0.7)


def test_uld_is_w1_between_sorted_zero_padded_probabilities():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.1, 0.7, 0.2]])  # student, teacher (any order)
    # sorted: [0.5, 0.5, 0] vs [0.7, 0.2, 0.1] -> |0.2| + |0.3| + |0.1| = 0.6
    assert float(uld_loss(p.log(), q.log(), torch.ones(1))) == pytest.approx(0.6)
    two = uld_loss(torch.stack([p, p]).log(), torch.stack([q, q.flip(-1)]).log(), torch.tensor([[1.0], [0.0]]))
    assert float(two) == pytest.approx(0.6)  # the masked position does not count


def test_uld_is_invariant_to_vocabulary_permutations_and_trains_the_student():
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher, mask = torch.randn(2, 5, 11), (torch.rand(2, 5) > 0.3).float()
    loss = uld_loss(student, teacher, mask)
    permuted = uld_loss(student[..., torch.randperm(7)], teacher[..., torch.randperm(11)], mask)
    torch.testing.assert_close(loss, permuted)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


# ------------------------------------------------------------------ the purifier
def test_identical_tokenizers_warn_and_targets_equal_the_single_teacher_targets(toks, texts):
    word, _ = toks
    ds = TokenDataset([{"prompt": "", "completion": t} for t in texts[:4]], word, 16)
    batch = ds.collate([ds.item(i) for i in range(len(ds))])
    assert "teacher_batches" not in batch and "offsets" not in batch  # the same-tokenizer path is unchanged
    teacher = llama(word, seed=3)
    vanilla = Distiller(llama(word), [teacher]).teacher_targets(batch, torch.float32)
    cross = Distiller(llama(word), [teacher], purifiers=[CrossBase(CrossBaseConfig(teachers=[0]))],
                      student_tokenizer=word, teacher_tokenizers=[word])
    with pytest.warns(UserWarning, match=r"cross_base: teachers\[0\] \(teacher0\) uses the student's tokenizer"):
        cross.setup_purifiers()
    targets = cross.teacher_targets(batch, torch.float32)
    assert torch.equal(targets.logits, vanilla.logits) and torch.equal(targets.weight, vanilla.weight)


def test_shared_vocab_targets_a_char_teacher_at_aligned_positions_only(toks, texts):
    word, char = toks
    batch = cross_batch(toks, texts)
    teacher = gpt2(char)
    d = Distiller(llama(word), [teacher], purifiers=[CrossBase(CrossBaseConfig())], student_tokenizer=word,
                  teacher_tokenizers=[char])
    d.setup_purifiers()
    targets = d.teacher_targets(batch, torch.float32)
    pos = target_positions(batch["offsets"], batch["teacher_batches"][0]["offsets"])
    aligned = (pos >= 0) & (batch["target_mask"] > 0)
    assert 0 < aligned.sum() < batch["target_mask"].sum()
    assert ((targets.weight > 0) == aligned).all()  # unaligned positions carry no signal
    b, p = aligned.nonzero()[0].tolist()
    with torch.no_grad():
        t_logits = teacher(**{k: batch["teacher_batches"][0][k] for k in ("input_ids", "attention_mask")}).logits
    logq, mass = map_logprobs(t_logits[b, pos[b, p]], vocab_map(word, char), len(word))
    torch.testing.assert_close(targets.logits[b, p], logq)
    assert float(targets.weight[b, p]) == pytest.approx(float(mass))
    metrics = d.purifiers[0].last_metrics
    share = float(aligned.sum() / batch["target_mask"].sum())
    assert float(metrics["position_coverage/teacher0"]) == pytest.approx(share)
    assert 0 < float(metrics["vocab_coverage/teacher0"]) <= 1


def test_a_second_cross_teacher_defers_to_the_primary_where_it_cannot_speak(toks, texts):
    word, char = toks
    batch = cross_batch(toks, texts)
    batch["teacher_batches"] = {1: batch["teacher_batches"].pop(0)}
    d = Distiller(llama(word), [llama(word, seed=3), gpt2(char)],
                  purifiers=[CrossBase(CrossBaseConfig()), Ensemble(EnsembleConfig(combine="mean"))],
                  student_tokenizer=word, teacher_tokenizers=[word, char])
    d.setup_purifiers()
    targets = d.teacher_targets(batch, torch.float32)
    with torch.no_grad():
        logits = d.teachers[0](batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    primary = F.log_softmax(logits[:, :-1], -1)
    unaligned = target_positions(batch["offsets"], batch["teacher_batches"][1]["offsets"]) < 0
    torch.testing.assert_close(targets.logits[unaligned], primary[unaligned])  # mean of p0 and p0
    assert not torch.allclose(targets.logits[~unaligned], primary[~unaligned])


def test_a_teacher_given_no_tokenizer_shares_the_students_as_in_the_distillers_own_check(toks, texts):
    word, char = toks
    batch = cross_batch(toks, texts)
    batch["teacher_batches"] = {1: batch["teacher_batches"].pop(0)}

    def targets(teacher_tokenizers):
        d = Distiller(llama(word), [llama(word, seed=3), gpt2(char)], purifiers=[CrossBase(CrossBaseConfig())],
                      student_tokenizer=word, teacher_tokenizers=teacher_tokenizers)
        d.setup_purifiers()  # None was taken as another tokenizer: vocab_map(word, None) crashed
        assert d.purifiers[0].aligned == [1]
        return d.teacher_targets(batch, torch.float32)

    named, unnamed = targets([word, char]), targets([None, char])
    assert torch.equal(named.logits, unnamed.logits) and torch.equal(named.weight, unnamed.weight)


def test_uld_primary_teacher_trains_through_the_w1_term_only(toks, texts):
    word, char = toks
    batch = cross_batch(toks, texts)
    d = Distiller(llama(word), [gpt2(char)], purifiers=[CrossBase(CrossBaseConfig(alignment="uld", weight=2.0))],
                  student_tokenizer=word, teacher_tokenizers=[char])
    before = [p.detach().clone() for p in d.student.parameters()]
    parts = d.fit_step(batch, d.build_optimizer(), progress=0.0)
    assert float(parts["distill"]) == 0.0 and float(parts["0_cross_base"]) > 0
    assert float(parts["0_cross_base"]) == pytest.approx(2.0 * float(d.purifiers[0].last_metrics["uld/teacher0"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, d.student.parameters()))


# ------------------------------------------------------------------ recipes
def test_word_student_trains_from_a_char_teacher_and_logs_coverage(saved, tmp_path):
    out = train(load_recipe(None, lm_overrides(saved, tmp_path / "run")))
    metrics = read_lineage(out)["metrics"]
    assert read_lineage(out)["step"] == 3
    for key in ("position_coverage/cross", "vocab_coverage/cross", "vocab_overlap/cross"):
        assert 0 < metrics[f"purify/0_cross_base/{key}"] <= 1
    assert "val/kl" in metrics and metrics["train/loss"] > 0


def test_other_tokenizer_without_cross_base_is_refused(saved, tmp_path):
    with pytest.raises(RecipeError, match=r"teachers\[0\].tokenizer: differs from the student's tokenizer; use the "
                                          r"same tokenizer or add a cross_base purifier"):
        build_run(load_recipe(None, lm_overrides(saved, tmp_path, purifiers="[]")))
    two = f"[{{config: {{model_type: llama, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2}}, " \
          f"tokenizer: {saved}/word, name: same}}, {{path: {saved}/char, name: cross}}]"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RecipeError, match=r"teachers\[1\].tokenizer: .* purifiers\[0\] \(cross_base\) does not "
                                              r"align it; add 1 to purifiers\[0\].teachers"):
            build_run(load_recipe(None, lm_overrides(saved, tmp_path, teachers=two,
                                                     purifiers="[{name: cross_base, teachers: [same]}]")))


@pytest.mark.parametrize("purifiers, extra, message", [
    ("[{name: anchor}, {name: cross_base}]", {}, r"purifiers\[1\].name: cross_base must be the first purifier"),
    ("[{name: cross_base, teachers: [nosuch]}]", {}, r"purifiers\[0\].teachers: unknown teacher 'nosuch'"),
    ("[{name: cross_base}]", {"loss.name": "reverse_kl"}, r"purifiers\[0\].name: cross_base gives some tokens zero target mass, which loss.name: reverse_kl"),
    ("[{name: cross_base, alignment: uld}, {name: ensemble}]", {}, r"purifiers\[1\].name: ensemble reads teacher outputs .* purifiers\[0\] \(cross_base with alignment: uld\)"),
    ("[{name: cross_base, alignment: uld, weight: -1}]", {}, r"purifiers\[0\].weight: must be >= 0"),
])
def test_bad_cross_base_settings_fail_at_load(saved, tmp_path, purifiers, extra, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, lm_overrides(saved, tmp_path, purifiers=purifiers, **extra))
