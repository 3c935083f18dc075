"""Students and teachers: build them from a :class:`~purify.config.ModelSpec`, run them uniformly, freeze teachers.

A spec is a Hugging Face causal LM (``path`` / ``builtin`` / ``gguf`` loaded with ``from_pretrained``, or
``config`` built from scratch) or a registered plain ``torch.nn.Module`` builder (``arch``, e.g. the MLP with class
and auxiliary logits of the subliminal-learning benchmark). :func:`model_forward` gives both the same output:
``ModelOutput(logits (B, T, V), hidden (B, T, H))`` aligned with ``batch["target_mask"]``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from purify.cache import CachedTeacher
from purify.config import ModelSpec
from purify.types import Batch, ModelOutput, RecipeError


class AuxMLP(nn.Module):
    """MLP with ``n_classes`` class logits and ``n_aux`` auxiliary logits (Cloud et al. 2025, §6).

    ``in_dim → hidden[0] → … → n_classes + n_aux`` with ReLU. As a distillation model it reads ``batch["x"]``
    ``(B, D)`` and returns logits ``(B, 1, n_classes + n_aux)`` and the last hidden layer ``(B, 1, H)``.
    """

    def __init__(self, in_dim: int = 64, hidden: list[int] | tuple[int, ...] = (256, 256), n_classes: int = 10,
                 n_aux: int = 3) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.body = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(dims[-1], n_classes + n_aux)
        self.n_classes, self.n_aux = n_classes, n_aux

    def forward(self, batch: Batch, hidden: bool = False) -> ModelOutput:
        h = self.body(batch["x"])
        return ModelOutput(logits=self.head(h)[:, None, :], hidden=h[:, None, :] if hidden else None)

    def logits(self, x: Tensor) -> Tensor:
        """All logits ``(B, n_classes + n_aux)`` for inputs ``x`` ``(B, D)``."""
        return self.head(self.body(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"aux_mlp": AuxMLP}
"""Registered plain-torch builders, by recipe name (``arch:``). Their ``forward(batch, hidden)`` returns a
:class:`ModelOutput`."""


CONFIG_KWARGS = ("model_type", "rope_theta", "rope_scaling", "partial_rotary_factor", "attn_implementation",
                 "experts_implementation", "torch_dtype", "dtype", "num_labels", "output_attentions", "name_or_path")
"""Keys every transformers config accepts although some versions keep them neither as ``__init__`` parameters nor as
attributes of their own name (read from ``**kwargs`` or folded into another field, e.g. ``rope_theta`` into
``rope_parameters``)."""


@functools.lru_cache(maxsize=None)
def config_fields(model_type: str) -> frozenset[str] | None:
    """The keys a ``config:`` dict of this transformers ``model_type`` may hold: its config class's ``__init__``
    parameters (of every class up its MRO), the attributes of a default instance and the class's properties, its
    ``attribute_map`` aliases and :data:`CONFIG_KWARGS`; ``None`` for a model type transformers does not know."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    cls = CONFIG_MAPPING[model_type]
    names = set(CONFIG_KWARGS) | set(getattr(cls, "attribute_map", {}) or {})
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {n for n, p in inspect.signature(init).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if klass.__module__.startswith("transformers.models."):  # keys read from **kwargs (gpt_neox's rotary_pct)
            with contextlib.suppress(OSError, TypeError):
                names |= set(re.findall(r"kwargs\.(?:get|pop)\(\s*[\"']([A-Za-z_]\w*)[\"']", inspect.getsource(klass)))
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a config class without usable defaults: its signature alone
        return frozenset(names)
    names |= set(vars(default))
    # the class's properties and plain attributes, read statically (running a property can warn of a deprecation)
    static = {n: inspect.getattr_static(cls, n) for n in dir(cls) if not n.startswith("__")}
    names |= {n for n, attr in static.items()
              if isinstance(attr, property) or not (callable(attr) or isinstance(attr, classmethod))}
    return frozenset(names)


def config_key_problems(config: Mapping[str, Any], where: str) -> list[str]:
    """A recipe's ``<where>.config`` keys that look like a misspelt field of its ``model_type``'s transformers
    config (transformers would keep each as an extra attribute and build the model with the default), one line each
    with the did-you-mean; an unknown key close to no field is only warned about (a key that config reads in a way
    :func:`config_fields` does not see must not block a run). Empty when the model type is missing or unknown
    (other checks say so)."""
    model_type = config.get("model_type")
    known = config_fields(model_type) if isinstance(model_type, str) else None
    if known is None:
        return []
    fields = sorted(n for n in known if not n.startswith("_") and n != "attribute_map")
    out = []
    for key in (str(k) for k in config if str(k) not in known):
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if close:
            out.append(f"{where}.config.{key}: unknown key for a {model_type} config; did you mean '{close[0]}'?")
        else:
            warnings.warn(f"{where}.config.{key}: not a field purify knows of transformers' {model_type} config; "
                          "transformers keeps it as an attribute, which the model may ignore", UserWarning,
                          stacklevel=2)
    return out


def arch_parameters(arch: str) -> str:
    """The keyword arguments a registered architecture's builder accepts, with defaults: ``in_dim=64, ...``."""
    params = inspect.signature(ARCHITECTURES[arch]).parameters.values()
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def arch_kwargs_problems(arch: str, kwargs: Mapping[str, Any], where: str) -> list[str]:
    """A recipe's ``<where>.kwargs`` that the builder of ``arch`` does not accept (unknown names, missing required
    ones), one line each naming its parameters; empty for an unregistered ``arch`` (another check says so)."""
    if arch not in ARCHITECTURES:
        return []
    params = inspect.signature(ARCHITECTURES[arch]).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = f"{arch} accepts {arch_parameters(arch)}"
    out = []
    for key in map(str, kwargs):
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            out.append(f"{where}.kwargs: unknown parameter {key!r}; {hint}{accepted}")
    for name in names:
        if params[name].default is params[name].empty and name not in kwargs:
            out.append(f"{where}.kwargs: missing {name!r}; {accepted}")
    return out


def spec_problems(spec: ModelSpec, where: str) -> list[str]:
    """What :func:`build_model` refuses in a spec before building anything: unknown ``config`` keys
    (:func:`config_key_problems`) and ``kwargs`` an ``arch`` builder does not take (:func:`arch_kwargs_problems`)."""
    if spec.config is not None:
        return config_key_problems(spec.config, where)
    if spec.arch is not None:
        return arch_kwargs_problems(spec.arch, spec.kwargs or {}, where)
    return []


@dataclass
class LoadedModel:
    """A built (or described, not yet built) model with what lineage needs to know about where it came from.

    A model from ``build_model(..., deferred=True)`` has ``module=None`` until :meth:`build` runs ``factory``; its
    ``name``, ``source``, ``tokenizer`` and ``config`` are known without building it.
    """

    module: nn.Module | None
    tokenizer: Any | None
    name: str
    source: str
    tokenizer_source: str | None
    factory: Callable[[], nn.Module] | None = None  # builds ``module`` (deferred models)
    config: Any | None = None  # the transformers config, for Hugging Face models

    def build(self) -> nn.Module:
        """The module, built now if it was deferred (once; later calls return the same module)."""
        if self.module is None:
            assert self.factory is not None, f"{self.name}: no module and no factory"
            self.module = self.factory()
        return self.module


WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel", "OptimizedModule")
"""Modules that run another (``module``; ``torch.compile``'s: ``_orig_mod``), looked through by :func:`is_hf_model`."""


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model, or a peft model (a LoRA student) around one, or either inside wrappers that run it
    (``DistributedDataParallel``, DeepSpeed's engine: ``module``; ``torch.compile``: ``_orig_mod``), which are then
    the ones called."""
    from transformers import PreTrainedModel

    from purify.lora import is_lora

    inner = model
    while type(inner).__name__ in WRAPPERS:  # by name: DeepSpeed need not be installed
        inner = getattr(inner, "_orig_mod", None) or inner.module
    return isinstance(inner, PreTrainedModel) or is_lora(inner)


def model_forward(model: nn.Module, batch: Batch, hidden: bool = False, shift: bool = True) -> ModelOutput:
    """Run a student or teacher on a batch; causal-LM logits are shifted to predict the next token.

    Args:
        model: a transformers causal LM (a peft LoRA model included) or a registered architecture.
        batch: collated batch (``input_ids``/``attention_mask`` or ``x``).
        hidden: also return the last hidden states.
        shift: drop a causal LM's last position (whose next token is not in the batch), so position ``t`` predicts
            token ``t + 1`` of ``input_ids`` as ``batch["target_mask"]`` expects; ``False`` keeps every position
            (what a Hugging Face model returns, e.g. for ``compute_metrics``).
    """
    if not is_hf_model(model):
        return model(batch, hidden=hidden)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
    end = -1 if shift else None
    h = out.hidden_states[-1][:, :end] if hidden else None
    return ModelOutput(logits=out.logits[:, :end], hidden=h)


def decoder_hidden(model: nn.Module, batch: Batch) -> Tensor:
    """``(B, T-1, H)``: a Hugging Face causal LM's last hidden states (after its final norm) at the positions whose
    next token :func:`model_forward`'s logits predict, without building the logits (its decoder alone)."""
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # type: ignore
    return out.last_hidden_state[:, :-1]


def output_layer(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A Hugging Face causal LM's output layer ``(weight (V, H), bias or None)``; see :func:`fused_problem`."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return head.weight, head.bias


@torch.no_grad()
def fused_problem(model: nn.Module, where: str) -> str | None:
    """Why ``model``'s logits cannot be computed as its output layer applied to :func:`decoder_hidden` (the fused
    linear loss, ``loss.fused_linear``), or ``None``: it must be a Hugging Face causal LM (LoRA included) whose output
    layer is a plain ``nn.Linear`` and whose logits equal that layer on the decoder's last hidden state — checked on
    a two-token probe, which catches soft-capped or scaled logits (Gemma-2, Cohere, Granite)."""
    if not is_hf_model(model):
        return f"{where} ({type(model).__name__}) is not a Hugging Face causal LM"
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear) or not callable(getattr(model, "get_decoder", None)):
        return (f"{where}'s output layer is {type(head).__name__}, not a plain Linear under a decoder (a LoRA "
                "modules_to_save head, for one)")
    training = model.training
    model.eval()
    try:
        weight = head.weight
        ids = torch.tensor([[0, min(1, weight.shape[0] - 1)]], device=weight.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        full = model(**batch).logits[0].float()
        fused = torch.nn.functional.linear(model.get_decoder()(**batch).last_hidden_state[0], weight,
                                           head.bias).float()
    finally:
        model.train(training)
    if not torch.allclose(full, fused, rtol=1e-3, atol=1e-3 * float(full.abs().max().clamp_min(1))):
        return (f"{where}'s logits are not its output layer applied to its decoder's last hidden state (soft-capped "
                "or scaled logits)")
    return None


def logit_width(model: nn.Module) -> int | None:
    """How many logits ``model`` returns per position, where it says so without a forward (an :class:`AuxMLP`'s
    classes plus auxiliary logits, a module's ``logit_count`` such as a logit cache's vocabulary, a Hugging Face
    model's output embeddings), else ``None``."""
    if isinstance(model, AuxMLP):
        return model.n_classes + model.n_aux
    declared = getattr(model, "logit_count", None)  # a teacher without weights (a logit cache) says it
    if isinstance(declared, int):
        return declared
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())  # ZeRO-3 keeps the full shape aside
    return int(shape[0]) if isinstance(weight, Tensor) and len(shape) == 2 else None


def freeze(model: nn.Module) -> nn.Module:
    """Make a teacher frozen: ``eval()``, no gradients; bf16 on GPU is the trainer's choice of precision."""
    model.eval()
    model.requires_grad_(False)
    return model


def state_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _resolve_dir(spec: ModelSpec) -> str:
    if spec.packaged is not None:
        from purify.models_prepare import prepare

        return str(prepare(spec.packaged))
    if spec.builtin is not None:
        from purify.lm.bases import resolve_base

        return str(resolve_base(spec.builtin))
    if spec.gguf is not None:
        from purify.gguf import load_gguf

        return str(load_gguf(spec.gguf))
    assert spec.path is not None
    return spec.path


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a directory, hub name, or builtin base name."""
    from transformers import AutoTokenizer

    if not Path(source).exists():
        from purify.lm.bases import BASES, resolve_base

        if source in BASES:
            source = str(resolve_base(source))
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def spec_tokenizer(spec: ModelSpec) -> Any | None:
    """The tokenizer a spec uses, without building its model (``None`` for ``arch`` models).

    Args:
        spec: a validated model spec (not a ``cache``).
    """
    if spec.arch is not None:
        return None
    return load_tokenizer(spec.tokenizer or _resolve_dir(spec), spec.trust_remote_code)


def build_model(spec: ModelSpec, seed: int, deferred: bool = False, where: str = "model") -> LoadedModel:
    """Build the module and tokenizer a spec describes.

    Args:
        spec: the recipe's model spec (validated). With ``lora`` the module is a peft LoRA model around the built
            one (:func:`purify.lora.apply_lora`), its adapter seeded like a ``config`` build.
        seed: init seed for ``config``/``arch`` builds (and a LoRA adapter) when ``spec.seed`` is unset.
        deferred: describe the model (name, source, tokenizer, config) but leave ``module`` unbuilt until
            :meth:`LoadedModel.build` (how teachers reach ``configure_model`` under ZeRO-3). A ``cache`` teacher holds
            no weights and is always built.
        where: the spec's recipe key (``student``, ``teachers[0]``), for error lines.

    Raises:
        RecipeError: :func:`spec_problems` (unknown ``config`` keys, ``kwargs`` the ``arch`` does not take).
    """
    problems = spec_problems(spec, where)
    if problems:
        raise RecipeError(problems)
    if spec.cache is not None:
        return load_cached_teacher(spec.cache, getattr(spec, "teacher", 0), spec.name)
    init_seed = spec.seed if spec.seed is not None else seed
    if spec.arch is not None:
        arch, kwargs = ARCHITECTURES[spec.arch], dict(spec.kwargs)

        def make_arch() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                return arch(**kwargs)

        return _loaded(LoadedModel(None, None, spec.name or spec.arch, f"arch:{spec.arch} seed={init_seed}", None,
                                   factory=_with_lora(make_arch, spec, init_seed)), deferred)

    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.config is not None:
        tok_source = str(spec.tokenizer)
        tokenizer = load_tokenizer(tok_source, spec.trust_remote_code)
        cfg_dict = dict(spec.config)
        cfg_dict.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                cfg_dict.setdefault(key, getattr(tokenizer, key))
        config = AutoConfig.for_model(**cfg_dict)

        def make_config() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                return AutoModelForCausalLM.from_config(config)

        name = spec.name or f"{config.model_type}-config"
        return _loaded(LoadedModel(None, tokenizer, name, f"config:{cfg_dict} seed={init_seed}", tok_source,
                                   factory=_with_lora(make_config, spec, init_seed), config=config), deferred)

    directory = _resolve_dir(spec)

    def make_pretrained() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(directory, revision=spec.revision,
                                                    trust_remote_code=spec.trust_remote_code)

    tok_source = spec.tokenizer or directory
    tokenizer = load_tokenizer(tok_source, spec.trust_remote_code)
    source = spec.path or (f"builtin:{spec.builtin}" if spec.builtin else
                           f"packaged:{spec.packaged}" if spec.packaged else f"gguf:{spec.gguf}")
    config = None if not deferred else AutoConfig.from_pretrained(directory, revision=spec.revision,
                                                                  trust_remote_code=spec.trust_remote_code)
    return _loaded(LoadedModel(None, tokenizer, spec.name or source, source, tok_source,
                               factory=_with_lora(make_pretrained, spec, init_seed), config=config), deferred)


def _with_lora(factory: Callable[[], nn.Module], spec: ModelSpec, seed: int) -> Callable[[], nn.Module]:
    """``factory``, wrapped in the LoRA adapter ``spec.lora`` describes (seeded by ``seed``) when it is set."""
    lora = getattr(spec, "lora", None)
    if lora is None:
        return factory

    def make_lora() -> nn.Module:
        from purify.lora import apply_lora

        base = factory()
        digest = state_sha256(base)  # before the adapter: comparable with the base's own hash (a teacher's, a hub's)
        model = apply_lora(base, lora, seed, revision=spec.revision)
        model.base_sha256 = digest
        return model

    return make_lora


def _loaded(model: LoadedModel, deferred: bool) -> LoadedModel:
    """``model`` built now unless ``deferred``; a built Hugging Face model's ``config`` is its module's."""
    if not deferred:
        module = model.build()
        model.config = getattr(module, "config", model.config)
    return model


def load_cached_teacher(directory: str, teacher: int = 0, name: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` for a recipe entry ``{cache: directory, teacher: i}`` (see :mod:`purify.cache`)."""
    module = CachedTeacher(directory, teacher)
    entry = module.manifest["teachers"][teacher]
    tok_dir = module.directory / "tokenizer"
    tokenizer = load_tokenizer(str(tok_dir)) if tok_dir.is_dir() else None
    source = f"cache:{directory}#{teacher} ({entry['source']}, sha256 {entry['sha256']})"
    return LoadedModel(module, tokenizer, name or entry["name"], source, str(tok_dir) if tokenizer else None)
