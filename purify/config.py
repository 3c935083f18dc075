"""Recipes: typed omegaconf structured configs, loading with dotlist overrides, and validation.

``load_recipe(path, overrides)`` merges ``OmegaConf.structured(Recipe)`` ⊕ YAML ⊕ dotlist, converts to dataclasses
and validates everything *before* any model is built. Every problem is a :class:`RecipeError` whose one-line
message names the dotted key path, the bad value, and the allowed values or the closest valid key. Recipes never
execute code: there are no import strings or ``_target_`` keys, and ``trust_remote_code`` is off unless set.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional  # noqa: UP035 - omegaconf needs typing generics

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from purify.storage import NotUTF8Error, not_a_directory, read_utf8
from purify.types import SEED_RANGE, LossName, RecipeError, first_line, is_int, is_real, is_seed

__all__ = ["STRATEGIES", "LoraSpec", "OnPolicyConfig", "Recipe", "RecipeError", "parse_recipe",
           "parse_recipe_problems", "recipe_problems", "structured", "to_dict", "to_yaml"]

STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
"""Recipe ``strategy`` values (built into Lightning strategies by :mod:`purify.strategy`)."""


@dataclass
class LoraSpec:
    """A LoRA adapter on a Hugging Face causal-LM student (``student.lora``; built with peft's ``LoraConfig``).

    The base weights are frozen and only the adapter trains: ``W x + (alpha / r) · B A x`` with ``A`` ``(r, n)``
    random and ``B`` ``(m, r)`` zero at the start (``alpha / √r`` with ``use_rslora``). ``purify train`` exports the
    adapter into ``student/`` and, with ``export_merged``, the merged model into ``student-merged/``.
    """

    r: int = 8  # adapter rank
    alpha: float = 16.0  # scale numerator: the update is (alpha / r) · B A
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: Optional[List[str]] = None  # module-name suffixes (q_proj, v_proj, ...) or [all-linear];
    # null = peft's default for the model type (q_proj, v_proj for Llama)
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train too
    modules_to_save: Optional[List[str]] = None  # modules trained in full and saved with the adapter (e.g. lm_head)
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    export_merged: bool = False  # also save the merged model (plain transformers) into output_dir/student-merged


@dataclass
class ModelSpec:
    """Where a student or teacher comes from. Exactly one of ``path``, ``builtin``, ``config``, ``arch``, ``gguf``,
    ``packaged``,
    ``cache`` (teachers only)."""

    path: Optional[str] = None  # local directory or hub name, loaded with from_pretrained
    builtin: Optional[str] = None  # a tiny base purify pretrains on its bundled corpus and caches (purify.lm)
    config: Optional[Dict[str, Any]] = None  # a transformers config (needs model_type), built with random init
    arch: Optional[str] = None  # a registered torch.nn builder (purify.models.ARCHITECTURES), e.g. aux_mlp
    gguf: Optional[str] = None  # a GGUF file, converted through transformers once and cached
    packaged: Optional[str] = None  # a real model shipped in pip packages (`purify models list`), prepared once
    cache: Optional[str] = None  # teachers only: a directory written by `purify cache` (purify.cache.CachedTeacher)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # arguments of the `arch` builder
    tokenizer: Optional[str] = None  # tokenizer dir or builtin name; defaults to path/builtin/gguf
    name: Optional[str] = None  # label used in logs and lineage.json; defaults to the source
    seed: Optional[int] = None  # init seed for `config`/`arch` builds; defaults to the recipe seed
    revision: Optional[str] = None  # hub revision to pin
    trust_remote_code: bool = False  # never true unless the recipe says so
    lora: Optional[LoraSpec] = None  # students only: train a LoRA adapter on frozen pretrained weights


@dataclass
class TeacherSpec(ModelSpec):
    """A frozen teacher. ``weight`` is its share in an ensemble; ``teacher`` picks one teacher of a ``cache``."""

    weight: float = 1.0
    teacher: int = 0  # with `cache`: which of the cached teachers (their order in the recipe that wrote the cache)


@dataclass
class DataConfig:
    """Training text. ``train`` is JSON Lines of {"prompt", "completion"} (.jsonl, .ndjson, .json, any case), a
    .txt (one document per line), ``bundled`` for the package's synthetic corpus, or ``noise`` (uniform vectors,
    for vector models)."""

    train: str = "bundled"
    val: Optional[str] = None  # held-out file; default: val_fraction of train
    val_fraction: float = 0.1
    max_length: int = 64  # tokens per example (longer examples are truncated)
    batch_size: int = 8  # micro-batch per process
    # samples per optimizer step over all processes; when set, batch_size is derived from it (validation fails when
    # trainer.devices × trainer.num_nodes × trainer.accumulate_grad_batches does not divide it)
    global_batch_size: Optional[int] = None
    noise_dim: int = 64  # input size for train=noise
    num_samples: int = 4096  # examples for train=noise


@dataclass
class LossConfig:
    """Distillation objective: ``soft(name) + hard_label_weight * CE``. See purify.losses for conventions."""

    name: LossName = "forward_kl"
    beta: float = 0.5  # JSD interpolation (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # divides both logits; the loss is multiplied by T^2
    hard_label_weight: float = 0.0  # weight of CE on the data's tokens
    logit_slice: Optional[List[int]] = None  # [start, stop): distil only these logits (e.g. auxiliary logits)
    # compute the loss from the student's last hidden states and output layer a few positions at a time, never
    # building its (B, T, V) logits (purify.losses_fused; Hugging Face students; the teacher's too where no
    # target-side purifier needs them)
    fused_linear: bool = False


@dataclass
class OnPolicyConfig:
    """On-policy distillation (Agarwal et al. 2024, GKD; :mod:`purify.on_policy`): with probability ``lam`` per
    optimizer step the batch's completions are replaced by the student's own samples from each prompt, and the
    teachers score those. The objective is ``loss`` (``name: jsd`` with ``beta`` is the paper's generalized JSD)."""

    lam: float = 0.5  # probability that an optimizer step trains on student samples (0 = off-policy, 1 = always)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling mass (1 = the full distribution)
    max_new_tokens: int = 32  # tokens sampled per prompt (fewer when the student ends the text)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    head_lr: Optional[float] = None  # learning rate of purifier heads (default: lr)


@dataclass
class SchedulerConfig:
    name: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accumulate_grad_batches: int = 1
    val_check_interval: int = 50  # validate every N optimizer steps
    limit_val_batches: int = 8  # global batches of held-out examples per validation, shared out between processes
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    gradient_clip_val: Optional[float] = None
    precision: str = "32-true"  # bf16-mixed on GPU
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    deterministic: bool = True
    enable_progress_bar: bool = True


@dataclass
class DeepSpeedConfig:
    offload_optimizer: bool = False
    offload_parameters: bool = False
    config: Optional[Any] = None  # a raw DeepSpeed config dict or a path to a JSON file


@dataclass
class Recipe:
    """A whole training run."""

    student: ModelSpec = MISSING
    teachers: List[TeacherSpec] = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    purifiers: List[Dict[str, Any]] = field(default_factory=list)  # e.g. [{name: anchor, weight: 0.01}]
    on_policy: Optional[OnPolicyConfig] = None  # null = off-policy (the data's completions only)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: str = "auto"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    seed: int = 0
    output_dir: str = "outputs/run"
    resume: Optional[str] = None  # a Lightning checkpoint (.ckpt) to continue from
    export: bool = True  # save_pretrained the student into output_dir/student at the end


def _closest(key: str, allowed: list[str]) -> str:
    match = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{match[0]}'? " if match else ""
    return f"{hint}allowed keys: {', '.join(sorted(allowed))}"


def _allowed_keys(cfg: DictConfig, dotted: str) -> list[str]:
    node: Any = cfg
    try:
        for part in [p for p in dotted.replace("]", "").replace("[", ".").split(".")[:-1] if p]:
            node = node[int(part)] if part.isdigit() else node[part]
    except (OmegaConfBaseException, KeyError, IndexError, TypeError):
        return []
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, prefix: str = "") -> RecipeError:
    key = f"{prefix}{getattr(err, 'full_key', '') or ''}"
    msg = first_line(getattr(err, "msg", None) or err)
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        leaf = key.rsplit(".", 1)[-1]
        return RecipeError(f"{key}: unknown key; {_closest(leaf, _allowed_keys(schema, key[len(prefix):]))}")
    if isinstance(err, MissingMandatoryValue):  # was omegaconf's "Structured config of type `Recipe` has missing ..."
        hint = f" (e.g. '{_REQUIRED[key]}')" if key in _REQUIRED else ""
        return RecipeError(f"{key}: missing; the recipe needs it: give it in the recipe or on the command line{hint}")
    return RecipeError(f"{key}: {_with_fix(msg, key)}")


_REQUIRED = {"student": "student={builtin: tiny-llama-a}", "teachers": "teachers=[{builtin: tiny-llama-b}]"}
"""The recipe sections without a default, and an example of each for the messages."""


def _with_fix(msg: str, key: str) -> str:
    """omegaconf's message for a value its field refuses, with the fix where it names none: an empty or null value
    where one is needed (``output_dir=``, a section left empty), or a plain value where a section's mapping or a
    list goes."""
    if re.fullmatch(r"field '[^']*' is not Optional", msg):
        return (f"needs a value (it has no default): give it, e.g. '{_REQUIRED[key]}'" if key in _REQUIRED else
                "needs a value (it cannot be empty or null); give one, or leave the key out for its default")
    section = re.fullmatch(r"Invalid type assigned: (\w+) is not a subclass of (\w+)\. value: (.*)", msg)
    if section:
        return (f"expected a mapping of {section.group(2)} keys (a section, e.g. {{key: value}}), got "
                f"{section.group(3)} ({section.group(1)})")
    listed = re.fullmatch(r"Invalid value assigned: (\w+) is not a ListConfig, TupleConfig, list, or tuple\.", msg)
    if listed:
        return f"expected a list (e.g. {key}=[{{...}}]), got a value of type {listed.group(1)}"
    return msg


def structured(schema: type, data: Any, prefix: str = "") -> Any:
    """Merge ``data`` (dict/DictConfig) onto a dataclass ``schema`` and convert, with RecipeError messages.

    Args:
        schema: a dataclass type.
        data: user values.
        prefix: dotted path of ``data`` in the recipe, for messages (e.g. ``"purifiers[1]."``).
    """
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, base, prefix) from None


def type_problems(config: Any, prefix: str, choices: bool = True) -> list[str]:
    """Values of a config dataclass built in Python that its fields' types do not allow, one ``<prefix><key>: ...``
    line each: what a recipe's conversion refuses (``temperature: x``, a misspelt choice, ``logit_slice: [10.5,
    13]``), and a number given as a str, which a recipe reads as the number it spells but Python keeps (compared with
    a number, it raised a bare TypeError). A numpy number is the number it holds (a sweep's ``np.logspace``).

    Args:
        choices: check ``Literal`` fields too (``False``: the caller's own checks name a misspelt choice).
    """
    def plain(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return value
        return int(value) if isinstance(value, numbers.Integral) else float(value)

    kinds = typing.get_type_hints(type(config))
    given = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)
             if choices or typing.get_origin(kinds.get(f.name)) is not Literal}
    try:
        converted = structured(type(config), given, prefix)
    except RecipeError as err:
        return list(err.problems)
    read = {key: getattr(converted, key) for key in given}
    return [f"{prefix}{key}: {value!r} is a {type(value).__name__}; give a {type(read[key]).__name__}"
            for key, value in given.items() if isinstance(value, str) and isinstance(read[key], (int, float))
            and not isinstance(read[key], bool)]


def _source_problems(spec: ModelSpec, where: str) -> list[str]:
    """Checks of one model source that need nothing but the spec and the file system."""
    sources = [k for k in ("path", "builtin", "config", "arch", "gguf", "packaged", "cache")
               if getattr(spec, k) is not None]
    if len(sources) != 1:
        got = ", ".join(sources) or "none"
        return [f"{where}: give exactly one of path, builtin, config, arch, gguf, packaged, cache (got {got})"]
    out = []
    if spec.config is not None and "model_type" not in spec.config:
        out.append(f"{where}.config: missing model_type; e.g. model_type: llama")
    if spec.config is not None and spec.tokenizer is None:
        out.append(f"{where}.tokenizer: a model built from `config` needs a tokenizer dir or builtin name")
    if spec.gguf is not None and not Path(spec.gguf).is_file():
        out.append(f"{where}.gguf: file not found: {spec.gguf}")
    if spec.path is not None and _looks_local(spec.path) and not Path(spec.path).exists():
        out.append(f"{where}.path: directory not found: {spec.path}")
    elif spec.path is not None and Path(spec.path).is_file():
        out.append(f"{where}.path: {spec.path} is a file; give the model's directory (the one holding config.json)")
    elif spec.path is not None and Path(spec.path).is_dir() and not any(
            Path(spec.path, name).is_file() for name in ("config.json", "adapter_config.json")):  # a model, a LoRA
        run = Path(spec.path, "student", "config.json").is_file()
        out.append(f"{where}.path: {spec.path} " + (f"is a purify run; its model is {Path(spec.path, 'student')}"
                                                     if run else "holds no config.json: not a saved model directory"))
    if spec.tokenizer is not None and Path(spec.tokenizer).is_file():
        out.append(f"{where}.tokenizer: {spec.tokenizer} is a file; give the tokenizer's directory, a hub name or a "
                   "builtin base")
    return out


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep in path and path.count("/") != 1


def recipe_problems(recipe: Recipe) -> list[str]:
    """Every problem of a converted recipe that the config alone can see, one line each (empty when none).

    Checks that need other parts of purify (model architectures, built-in bases, logit caches, purifier configs
    and contracts, strategies) are :func:`purify.assembly.validate`'s.
    """
    out = _source_problems(recipe.student, "student")
    if not recipe.teachers:
        out.append("teachers: at least one teacher is needed")
    for i, teacher in enumerate(recipe.teachers):
        out += _source_problems(teacher, f"teachers[{i}]")
    unusable = [f"teachers[{i}].weight: {t.weight} is not a finite number; give one >= 0"
                for i, t in enumerate(recipe.teachers) if not math.isfinite(t.weight)]
    out += unusable  # .inf/.nan passed (< and <= are false for NaN) until the models were built
    if recipe.teachers and not unusable and (sum(t.weight for t in recipe.teachers) <= 0
                                             or any(t.weight < 0 for t in recipe.teachers)):
        out.append("teachers[*].weight: weights must be >= 0 and sum to a positive number")
    data = recipe.data
    if data.train not in ("bundled", "noise") and not Path(data.train).is_file():
        out.append(f"data.train: file not found: {data.train}; give a .jsonl/.txt path, 'bundled' or 'noise'")
    if data.train == "noise" and recipe.student.arch is None:  # was a KeyError: 'input_ids' at the first batch
        out.append("data.train: noise gives vectors for `arch` students (vector models); a language-model student "
                   "needs text: give a .jsonl/.txt path or 'bundled'")
    if data.val is not None and not Path(data.val).is_file():
        out.append(f"data.val: file not found: {data.val}")
    if not 0.0 <= data.val_fraction < 1.0:
        out.append(f"data.val_fraction: {data.val_fraction} is not in [0, 1)")
    elif data.val is None and data.val_fraction == 0 and recipe.trainer.limit_val_batches != 0 and \
            data.train != "noise":  # noise validates on its own draws
        out.append("data.val_fraction: 0 holds out nothing, and validation would then read training data; give "
                   "data.val, a val_fraction > 0, or trainer.limit_val_batches=0 (no validation)")
    out += [f"data.{key}: must be >= 1, got {getattr(data, key)}"
            for key in ("max_length", "batch_size", "num_samples", "noise_dim") if getattr(data, key) < 1]
    out += loss_problems(recipe.loss)
    if recipe.student.arch is not None and (recipe.loss.name == "ce" or recipe.loss.hard_label_weight > 0):
        key = "loss.name: ce" if recipe.loss.name == "ce" else "loss.hard_label_weight: the cross-entropy term"
        out.append(f"{key} trains on the data's next tokens, but a vector-model student (student.arch "
                   f"{recipe.student.arch}) reads vectors with no labels (every step would add 0); use a soft loss "
                   "without hard_label_weight")
    if recipe.loss.fused_linear and recipe.student.arch is not None:
        out.append("loss.fused_linear: needs a Hugging Face causal-LM student (its decoder and output layer); "
                   f"student.arch {recipe.student.arch} builds its own logits: turn fused_linear off")
    if recipe.loss.fused_linear and recipe.strategy == "deepspeed_stage_3":
        out.append("loss.fused_linear: reads the student's output layer outside its forward, which ZeRO-3 keeps "
                   "partitioned; use deepspeed_stage_2 (or 1) or turn fused_linear off")
    out += optim_problems(recipe.optim, recipe.scheduler)
    out += [f"{where}: must be {SEED_RANGE}, got {seed}" for where, seed in (
        ("seed", recipe.seed), ("student.seed", recipe.student.seed),
        *((f"teachers[{i}].seed", t.seed) for i, t in enumerate(recipe.teachers)))
        if seed is not None and not is_seed(seed)]
    t = recipe.trainer
    out += [f"trainer.{key}: must be >= 1, got {getattr(t, key)}"
            for key in ("max_steps", "accumulate_grad_batches", "val_check_interval", "log_every_n_steps",
                        "checkpoint_every_n_steps", "num_nodes") if getattr(t, key) < 1]
    if t.limit_val_batches < 0:
        out.append(f"trainer.limit_val_batches: must be >= 0 (0 = no validation), got {t.limit_val_batches}")
    if t.gradient_clip_val is not None and not (t.gradient_clip_val > 0 and math.isfinite(t.gradient_clip_val)):
        out.append(f"trainer.gradient_clip_val: must be a finite number > 0, or null for no clipping, got "
                   f"{t.gradient_clip_val}")
    if isinstance(t.devices, int) and not isinstance(t.devices, bool) and (t.devices == 0 or t.devices < -1):
        out.append(f"trainer.devices: must be >= 1, -1 (all), 'auto' or a list of device ids, got {t.devices}")
    if recipe.strategy not in STRATEGIES:
        close = difflib.get_close_matches(recipe.strategy, STRATEGIES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        out.append(f"strategy: unknown strategy {recipe.strategy!r}; {hint}allowed: {', '.join(STRATEGIES)}")
    if recipe.resume is not None and not Path(recipe.resume).exists():  # a file, or a DeepSpeed checkpoint dir
        out.append(f"resume: checkpoint not found: {recipe.resume}")
    elif recipe.resume is not None and recipe.strategy.startswith("deepspeed") and Path(recipe.resume).is_file():
        out.append(f"resume: {recipe.resume} is a single-file checkpoint; {recipe.strategy} resumes only its own "
                   "sharded checkpoint directories: resume it with the strategy that wrote it (auto or ddp), or start "
                   "this one afresh")
    blocked = not_a_directory(recipe.output_dir)
    if blocked:
        out.append(f"output_dir: {blocked}; give a directory path")
    out += _lora_problems(recipe)
    out += _on_policy_problems(recipe)
    return out


def loss_value_problems(beta: float, temperature: float, hard_label_weight: float) -> list[tuple[str, str]]:
    """``(key, problem)`` for each loss setting out of its range: the one rule set behind :func:`loss_problems` and
    the library loss functions (:meth:`purify.losses_chunked.LossSpec.of`, the per-position losses' temperature)."""
    out = []
    if not (is_real(beta) and 0.0 <= beta <= 1.0):
        out.append(("beta", f"{beta} is not in [0, 1]"))
    if not (is_real(temperature) and temperature > 0):
        out.append(("temperature", f"must be a finite number > 0, got {temperature}"))
    if not (is_real(hard_label_weight) and hard_label_weight >= 0):
        out.append(("hard_label_weight", f"must be a finite number >= 0, got {hard_label_weight}"))
    return out


def cache_problems(loss: LossConfig, teacher: str, on_policy: bool = False, whole: bool = False) -> list[str]:
    """Why ``loss`` (and ``on_policy``) cannot distil from a logit-cache teacher (named ``teacher``). The cache holds
    each position of the data's text with its top-k log-probabilities over all the teacher's outputs and spreads the
    rest of the mass evenly over the other tokens, so: a temperature other than 1 turns the even tail into another
    target (at T = 2 a peaked teacher's top-8 kept 0.83 of the tempered mass, its cached copy 0.42); ``mse`` compares
    raw logits, not log-probabilities (10 × the live loss with a cache of the whole vocabulary); a ``logit_slice``
    is mostly the even tail (the top-k of all outputs, 0-2 of an aux-MLP's 3 sliced logits); an on-policy student's
    samples are no text the cache scored. A cache of the ``whole`` vocabulary (its k at least the teacher's width)
    is exact: only the on-policy refusal stays (``purify.assembly`` reads that from the manifest)."""
    out = []
    if not whole and loss.name != "ce" and isinstance(loss.temperature, (int, float)) and loss.temperature != 1:
        out.append(f"loss.temperature: {loss.temperature} with a logit-cache teacher ({teacher}), which keeps the "
                   "top-k log-probabilities and spreads the rest evenly: a temperature turns that into another target "
                   "(the even tail takes far more of the tempered mass than the teacher's own); give temperature 1.0, "
                   "or the teacher as a model")
    if loss.name == "mse":  # even a whole cache: log-probabilities, not logits
        out.append(f"loss.name: mse compares raw logits, but a logit-cache teacher ({teacher}) holds log-probabilities "
                   "(the top-k, the rest spread evenly); use forward_kl, reverse_kl or jsd, or the teacher as a model")
    if loss.logit_slice is not None and not whole:
        out.append(f"loss.logit_slice: a logit-cache teacher ({teacher}) keeps the top-k of all its outputs, not of "
                   "the slice the loss distils (most of the slice would be the even tail); give the teacher as a model")
    if on_policy:
        out.append(f"on_policy: {teacher} is a logit cache, which holds scores for the data's text only, not the "
                   "student's samples; give the teacher as a model or remove on_policy")
    return out


def optim_problems(optim: OptimConfig, scheduler: SchedulerConfig) -> list[str]:
    """What is wrong with the optimizer and schedule settings, one ``optim.<key>``/``scheduler.<key>`` line each: a
    recipe's, and those given to a :class:`purify.module.Distiller` in Python (where no type check has run: a
    misspelt ``name`` built Adam, or ran cosine)."""
    out = []
    for key, cfg in (("optim.name", optim), ("scheduler.name", scheduler)):
        allowed = typing.get_args(typing.get_type_hints(type(cfg))["name"])
        if cfg.name not in allowed:
            out.append(f"{key}: {cfg.name!r} is not one of {', '.join(allowed)}")
    if not (isinstance(optim.lr, (int, float)) and optim.lr > 0 and math.isfinite(optim.lr)):
        out.append(f"optim.lr: must be a finite number > 0, got {optim.lr}")
    if not (isinstance(optim.weight_decay, (int, float)) and optim.weight_decay >= 0
            and math.isfinite(optim.weight_decay)):
        out.append(f"optim.weight_decay: must be a finite number >= 0, got {optim.weight_decay}")
    head_lr = optim.head_lr
    if head_lr is not None and not (isinstance(head_lr, (int, float)) and head_lr > 0 and math.isfinite(head_lr)):
        out.append(f"optim.head_lr: must be a finite number > 0, or null for optim.lr, got {head_lr}")
    betas = list(optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        out.append(f"optim.betas: expected two numbers in [0, 1) (Adam's beta1, beta2), got {betas}")
    if scheduler.warmup_steps < 0:
        out.append(f"scheduler.warmup_steps: must be >= 0, got {scheduler.warmup_steps}")
    return out


def loss_problems(loss: LossConfig) -> list[str]:
    """What is wrong with a :class:`LossConfig` on its own, one ``loss.<key>: ...`` line each (a recipe's, and a
    :class:`purify.module.Distiller` built in Python)."""
    names = typing.get_args(LossName)
    out = [] if loss.name in names else [f"loss.name: unknown loss {loss.name!r}; expected one of {list(names)}"]
    out += [f"loss.{key}: {problem}" for key, problem in
            loss_value_problems(loss.beta, loss.temperature, loss.hard_label_weight)]
    sl = loss.logit_slice
    if sl is not None and (len(sl) != 2 or not 0 <= sl[0] < sl[1]):
        out.append(f"loss.logit_slice: expected [start, stop) with 0 <= start < stop, got {list(sl)}")
    if sl is not None and (loss.name == "ce" or loss.hard_label_weight > 0):
        out.append("loss.logit_slice: hard labels (loss.name ce, or loss.hard_label_weight > 0) are token ids of the "
                   "whole vocabulary, not of the slice; drop the slice or the hard labels")
    if loss.fused_linear and sl is not None:
        out.append("loss.fused_linear: distils every logit of the output layer; it cannot take loss.logit_slice "
                   "(drop one of the two)")
    return out


def logit_slice_problem(logit_slice: list[int] | None, width: int, model: str) -> str | None:
    """The problem of a ``loss.logit_slice`` that reaches past the ``width`` logits of ``model`` (a slice past the end
    would quietly distil fewer logits, or none, than asked), or ``None``."""
    if logit_slice is None or logit_slice[1] <= width:
        return None
    return (f"loss.logit_slice: {list(logit_slice)} reaches past the {width} logits of {model}; give [start, stop) "
            f"with stop <= {width}")


def on_policy_value_problems(op: OnPolicyConfig) -> list[str]:
    """What is wrong with an :class:`OnPolicyConfig`'s values, one ``on_policy.<key>: ...`` line each: a recipe's,
    and one given in Python (:func:`purify.on_policy.sampler_for`, which every trainer builds its sampler with)."""
    out = []
    if not 0.0 <= op.lam <= 1.0:
        out.append(f"on_policy.lam: {op.lam} is not in [0, 1]; 0 = off-policy, 1 = every step on student samples")
    if not (op.temperature > 0 and math.isfinite(op.temperature)):
        out.append(f"on_policy.temperature: must be a finite number > 0, got {op.temperature}; 1.0 samples the "
                   "student as it is")
    if not 0.0 < op.top_p <= 1.0:
        out.append(f"on_policy.top_p: {op.top_p} is not in (0, 1]; 1.0 keeps the full distribution")
    if op.max_new_tokens < 1:
        out.append(f"on_policy.max_new_tokens: must be >= 1, got {op.max_new_tokens}")
    return out


def _on_policy_problems(recipe: Recipe) -> list[str]:
    """``on_policy`` values, and on-policy only where it can work: a language-model student sampling its own text
    that every teacher scores as a model (purifiers that need teachers in their own tokenization are refused by
    their contract in :func:`purify.purifiers.checks.contract_problems`)."""
    op = recipe.on_policy
    if op is None:
        return []
    out = on_policy_value_problems(op)
    if recipe.student.arch is not None:
        out.append("on_policy: the student samples its own text, but student.arch is a vector model with no "
                   "tokenizer; give a language-model student or remove on_policy")
    return out  # a logit-cache teacher: cache_problems


def _lora_problems(recipe: Recipe) -> list[str]:
    """``student.lora`` values, and LoRA only where it can work: a pretrained Hugging Face student, no teacher."""
    out = [f"teachers[{i}].lora: teachers are frozen, so an adapter on one would never train; LoRA applies to the "
           "student only, remove it" for i, t in enumerate(recipe.teachers) if t.lora is not None]
    lora, student = recipe.student.lora, recipe.student
    if lora is None:
        return out
    kinds = {"arch": "a plain torch module (a vector model)", "cache": "a logit cache",
             "config": "a random initialisation whose weights are never saved, so the adapter could not be loaded"}
    kind = next((k for k in kinds if getattr(student, k) is not None), None)
    if kind is not None:
        out.append(f"student.lora: LoRA adapts a pretrained Hugging Face causal LM, but student.{kind} is "
                   f"{kinds[kind]}; give the student as path, builtin or gguf, or remove student.lora")
    return out + lora_spec_problems(lora)


def lora_spec_problems(lora: LoraSpec, where: str = "student.lora") -> list[str]:
    """What is wrong with a :class:`LoraSpec`'s values, one ``<where>.<key>: ...`` line each (a recipe's, and one
    given to :func:`purify.lora.apply_lora` in Python)."""
    out = []
    if not is_int(lora.r, 1):
        out.append(f"{where}.r: must be an int >= 1, got {lora.r!r}")
    if not (is_real(lora.alpha) and lora.alpha > 0):
        out.append(f"{where}.alpha: must be a finite number > 0, got {lora.alpha!r}")  # 0: the adapter never trains
    if not (is_real(lora.dropout) and 0.0 <= lora.dropout < 1.0):
        out.append(f"{where}.dropout: {lora.dropout!r} is not in [0, 1)")
    biases = typing.get_args(typing.get_type_hints(LoraSpec)["bias"])
    if lora.bias not in biases:
        out.append(f"{where}.bias: {lora.bias!r} is not one of {', '.join(biases)}")
    for key in ("target_modules", "modules_to_save"):
        names = getattr(lora, key)
        if isinstance(names, str):  # one problem per character followed
            out.append(f"{where}.{key}: give a list of module names (e.g. [{names}]), got the string {names!r}")
        elif names is not None and (not names or any(not str(n).strip() for n in names)):
            out.append(f"{where}.{key}: give module names (e.g. [q_proj, v_proj]) or null, got {list(names)}")
    targets = lora.target_modules
    if isinstance(targets, (list, tuple)) and "all-linear" in targets and len(targets) > 1:
        out.append(f"{where}.target_modules: all-linear stands alone; give [all-linear] or a list of names")
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _unknown_keys(cls: type, data: Any, prefix: str) -> list[str]:
    """Keys of ``data`` (a plain dict) that the dataclass ``cls`` does not have, recursively, one line each."""
    if not isinstance(data, dict):
        return []
    hints, out = _field_types(cls), []
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            out.append(f"{where}: unknown key; {_closest(str(key), list(hints))}")
            continue
        tp = _strip_optional(hints[key])
        if dataclasses.is_dataclass(tp):
            out += _unknown_keys(tp, value, f"{where}.")
        elif typing.get_origin(tp) in (list, List) and isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            if dataclasses.is_dataclass(item):
                for i, entry in enumerate(value):
                    out += _unknown_keys(item, entry, f"{where}[{i}].")
    return out


def _unknown_path(cls: type, key: str) -> list[str]:
    """The problem with a dotted override key (``purifiers.0.threshold``) that the dataclass ``cls`` lacks."""
    tp: Any = cls
    done: list[str] = []
    for part in key.split("."):
        tp = _strip_optional(tp)
        if typing.get_origin(tp) in (list, List) and part.isdigit():
            (tp,) = typing.get_args(tp) or (Any,)
        elif dataclasses.is_dataclass(tp):
            hints = _field_types(tp)
            if part not in hints:
                return [f"{'.'.join([*done, part])}: unknown key; {_closest(part, list(hints))}"]
            tp = hints[part]
        else:
            return []
        done.append(part)
    return []


def _leaves(cls: type, data: dict[str, Any], node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for each value of ``data``, descending into nested dataclass sections that the schema
    ``node`` holds (a section still ``MISSING`` there, like ``student``, is one value)."""
    hints, out = _field_types(cls), []
    for key, value in data.items():
        tp = _strip_optional(hints.get(key, Any))
        if (dataclasses.is_dataclass(tp) and isinstance(value, dict) and isinstance(node, DictConfig)
                and key in node and not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig)):
            out += _leaves(tp, value, node[key], f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key a mapping already holds: PyYAML keeps the last, so a section repeated at
    the end of a copied recipe (``trainer: {max_steps: 2}``) silently put every other key of it back to its default."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: flattened by the base class, where an
                continue                                  # explicit key may override a merged one
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                again = key in seen
            except TypeError:  # an unhashable key: the base class says so
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    f"while reading the mapping that starts at line {node.start_mark.line + 1}", node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1}; YAML would keep this one "
                    "alone): merge the two",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing duplicate keys (:class:`UniqueKeyLoader`): recipes and probe files."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what a YAML parse error is, for a message: ``" at line 3, column 5: <problem>"`` (``": <first line>"``
    for an error without a position)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(err, 'problem', None) or first_line(err)}"


def _load_yaml(path: str | Path) -> dict[str, Any]:
    if Path(path).is_dir():
        raise RecipeError(f"recipe: {path} is a directory; give a recipe YAML file (see recipes/)")
    if not Path(path).is_file():
        raise RecipeError(f"recipe: file not found: {path}")
    try:
        data = load_yaml(read_utf8(path))
    except NotUTF8Error as err:
        raise RecipeError(f"recipe: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe: cannot parse {path}{yaml_problem(err)}; fix the YAML syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: {path} holds a {type(data).__name__}, not a mapping of recipe keys")
    return data


def parse_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe, apply ``key=value`` dotlist overrides and convert to :class:`Recipe`.

    Raises:
        RecipeError: listing every schema problem found (see :func:`parse_recipe_problems`).
    """
    recipe, problems = parse_recipe_problems(path, overrides)
    if problems or recipe is None:
        raise RecipeError(problems)
    return recipe


def parse_recipe_problems(path: str | Path | None = None,
                          overrides: list[str] | None = None) -> tuple[Recipe | None, list[str]]:
    """Parse a recipe and list every schema problem, not only the first.

    Unknown keys and values of the wrong type are skipped and reported (one ``"<dotted.key>: <problem>; <fix>"``
    line each); the rest is still converted, so later checks can report their problems too. Only the schema is
    checked here; :func:`purify.assembly.load_recipe` also runs every cross-domain check.

    Args:
        path: YAML file, or ``None`` for the defaults alone.
        overrides: omegaconf dotlist, e.g. ``["trainer.max_steps=20", "loss.name=jsd"]``.

    Returns:
        The recipe (``None`` when it cannot be converted at all) and the problems.

    Raises:
        RecipeError: when the YAML file is missing or cannot be parsed.
    """
    data = _load_yaml(path) if path is not None else {}
    problems = _unknown_keys(Recipe, data, "")
    schema = OmegaConf.structured(Recipe)
    items: list[tuple[str, Any]] = [(k, v) for k, v in _leaves(Recipe, data, schema)
                                    if not any(p.startswith(f"{k}:") or p.startswith(f"{k}.") or p.startswith(f"{k}[")
                                               for p in problems)]
    overridden: set[int] = set()  # the items that come from the command line
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value (e.g. trainer.max_steps=20)")
            continue
        key, value = item.split("=", 1)
        unknown = _unknown_path(Recipe, key)
        problems += unknown
        if unknown:
            continue
        dropped = _yaml_comment(value)  # output_dir="runs/exp #3" wrote to runs/exp
        if dropped:
            problems.append(f"override {item!r}: YAML reads {dropped!r} as a comment and would drop it; quote the "
                            f"value in YAML (e.g. \"output_dir='runs/exp #3'\") or leave the '#' out")
            continue
        try:
            items.append((key, OmegaConf.from_dotlist([f"v={value}"]).v))
            overridden.add(len(items) - 1)
        except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
            problems.append(f"override {item!r}: cannot read the value ({first_line(err)}); give YAML as on a "
                            "recipe line, e.g. key=[a,b] or 'key={name: x}' (an override cannot refer to another key: "
                            "${seed} is not resolved here)")
    merged = OmegaConf.merge(schema)
    for index, (key, value) in enumerate(items):
        past = _past_the_end(merged, key)
        if past:
            problems.append(past)
            continue
        try:  # update() also reaches into list items: purifiers.0.threshold=0.1
            _open_optional_section(merged, key)
            if index in overridden and isinstance(value, DictConfig):
                _clear(merged, key)  # a mapping on the command line replaces the entry, it is not merged into it
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as err:
            problems.append(str(_explain(err, schema)) if getattr(err, "full_key", None) else f"{key}: "
                            f"{_with_fix(first_line(getattr(err, 'msg', None) or err), key)}")
        except (TypeError, ValueError, IndexError, KeyError) as err:
            problems.append(f"{key}: {first_line(err)}")
    try:
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        named = {p.split(":", 1)[0] for p in problems}  # a section already refused is not "missing" too
        return None, problems + [p for p in _explain(err, schema).problems if p.split(":", 1)[0] not in named]
    return _expand_home(recipe), problems


def _yaml_comment(value: str) -> str:
    """The end of an override's value that YAML reads as a comment and drops (``""`` when none): text after the
    last token the YAML scanner finds (a quoted ``'x #y'`` inside a list is part of its token)."""
    try:  # a tab the scanner refuses where OmegaConf reads it as a space: scanned as one (same indices)
        tokens = [t for t in yaml.scan(value.replace("\t", " "))
                  if not isinstance(t, (yaml.StreamStartToken, yaml.StreamEndToken))]
    except yaml.YAMLError:
        return ""  # unreadable: the parse below names it
    return value[max((t.end_mark.index for t in tokens), default=0):].strip()


PATH_FIELDS = ("path", "gguf", "tokenizer", "cache")
"""The :class:`ModelSpec` fields that may name a local path (``~`` expanded, :func:`_expand_home`)."""


def _expand_home(recipe: Recipe) -> Recipe:
    """A recipe whose path values starting with ``~`` name the user's home, as a shell would have expanded them on
    the command line (model sources, data files, ``resume``, ``output_dir``)."""
    def home(value: Any) -> Any:
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    for spec in (recipe.student, *recipe.teachers):
        for key in PATH_FIELDS:
            setattr(spec, key, home(getattr(spec, key)))
    recipe.data.train, recipe.data.val = home(recipe.data.train), home(recipe.data.val)
    recipe.resume, recipe.output_dir = home(recipe.resume), home(recipe.output_dir)
    return recipe


def _past_the_end(cfg: DictConfig, key: str) -> str | None:
    """The problem of a dotted ``key`` that indexes a list item the recipe does not have (``purifiers.0.threshold=0.1``
    with no purifier), or ``None``."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1] if not parts[-1].isdigit() else parts):
        if isinstance(node, ListConfig) and part.isdigit():
            if int(part) >= len(node):
                path = ".".join(parts[:i])
                return (f"{key}: there is no {path}[{part}] (the recipe has {len(node)}); give the whole list, e.g. "
                        f"'{path}=[{{...}}]', or index an entry it has")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node.keys():  # `in node` is False for a missing value
            if OmegaConf.is_missing(node, part):
                if not isinstance(node._get_node(part), ListConfig):
                    return None  # a required section: _open_optional_section gives it its defaults
                path = ".".join(parts[:i + 1])  # a required list the recipe leaves out (teachers.0.builtin=...)
                return (f"{key}: the recipe has no {path} list; give it whole, e.g. '{path}=[{{builtin: "
                        "tiny-llama-b}]'")
            node = node[part]
        else:
            return None
    return None


def _clear(cfg: DictConfig, key: str) -> None:
    """Put the entry at a dotted ``key`` back to its schema's defaults (a section: its dataclass; a purifier entry: an
    empty mapping), so that a mapping given for it on the command line replaces it whole: ``'purifiers.0={name:
    anchor}'`` no longer keeps the old entry's other keys (reported as the user's), ``'student={packaged: x}'`` no
    longer keeps the recipe's other source."""
    tp: Any = Recipe
    for part in key.split("."):
        if part.isdigit():
            args = typing.get_args(_strip_optional(tp))
            tp = args[0] if args else Any
        else:
            tp = _field_types(tp).get(part, Any) if dataclasses.is_dataclass(tp) else Any
        tp = _strip_optional(tp)
    fresh = OmegaConf.structured(tp) if dataclasses.is_dataclass(tp) else {}
    OmegaConf.update(cfg, key, fresh, merge=False)


def _open_optional_section(cfg: DictConfig, key: str) -> None:
    """Give each null optional section on a dotted override's path its defaults (``on_policy.lam=0.5``,
    ``student.lora.r=16``), and a required one the recipe leaves out (``student.builtin=tiny-llama-a``)."""
    node: Any = cfg
    tp: Any = Recipe
    for part in key.split(".")[:-1]:
        if not (dataclasses.is_dataclass(tp) and isinstance(node, DictConfig) and part in node.keys()):
            return
        tp = _strip_optional(_field_types(tp).get(part, Any))
        if dataclasses.is_dataclass(tp) and (OmegaConf.is_missing(node, part) or node[part] is None):
            node[part] = tp()  # a required section the recipe leaves out (student.builtin=...) too
        node = node[part]


def to_yaml(obj: Any) -> str:
    """Resolved YAML of a recipe (or any dataclass), for output dirs and lineage."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a dataclass config (for JSON)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
