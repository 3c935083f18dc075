"""Recipes: typed omegaconf structured configs, loading with dotlist overrides, and validation.

``load_recipe(path, overrides)`` merges ``OmegaConf.structured(Recipe)`` ⊕ YAML ⊕ dotlist, converts to dataclasses
and validates everything *before* any model is built. Every problem is a :class:`RecipeError` whose one-line
message names the dotted key path, the bad value, and the allowed values or the closest valid key. Recipes never
execute code: there are no import strings or ``_target_`` keys, and ``trust_remote_code`` is off unless set.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional  # noqa: UP035 - omegaconf needs typing generics

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


class RecipeError(ValueError):
    """A recipe problem, reported as ``"<dotted.key>: <what is wrong>; <how to fix>"``."""


@dataclass
class ModelSpec:
    """Where a student or teacher comes from. Exactly one of ``path``, ``builtin``, ``config``, ``arch``, ``gguf``,
    ``cache`` (teachers only)."""

    path: Optional[str] = None  # local directory or hub name, loaded with from_pretrained
    builtin: Optional[str] = None  # a tiny base purify pretrains on its bundled corpus and caches (purify.lm)
    config: Optional[Dict[str, Any]] = None  # a transformers config (needs model_type), built with random init
    arch: Optional[str] = None  # a registered torch.nn builder (purify.models.ARCHITECTURES), e.g. aux_mlp
    gguf: Optional[str] = None  # a GGUF file, converted through transformers once and cached
    cache: Optional[str] = None  # teachers only: a directory written by `purify cache` (purify.cache.CachedTeacher)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # arguments of the `arch` builder
    tokenizer: Optional[str] = None  # tokenizer dir or builtin name; defaults to path/builtin/gguf
    name: Optional[str] = None  # label used in logs and lineage.json; defaults to the source
    seed: Optional[int] = None  # init seed for `config`/`arch` builds; defaults to the recipe seed
    revision: Optional[str] = None  # hub revision to pin
    trust_remote_code: bool = False  # never true unless the recipe says so


@dataclass
class TeacherSpec(ModelSpec):
    """A frozen teacher. ``weight`` is its share in an ensemble; ``teacher`` picks one teacher of a ``cache``."""

    weight: float = 1.0
    teacher: int = 0  # with `cache`: which of the cached teachers (their order in the recipe that wrote the cache)


@dataclass
class DataConfig:
    """Training text. ``train`` is a .jsonl of {"prompt", "completion"}, a .txt (one document per line), or
    ``bundled`` for the package's synthetic corpus, or ``noise`` (uniform vectors, for vector models)."""

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

    name: Literal["forward_kl", "reverse_kl", "jsd", "mse", "ce"] = "forward_kl"
    beta: float = 0.5  # JSD interpolation (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # divides both logits; the loss is multiplied by T^2
    hard_label_weight: float = 0.0  # weight of CE on the data's tokens
    logit_slice: Optional[List[int]] = None  # [start, stop): distil only these logits (e.g. auxiliary logits)


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
    limit_val_batches: int = 8
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
    for part in [p for p in dotted.replace("]", "").replace("[", ".").split(".")[:-1] if p]:
        node = node[int(part)] if part.isdigit() else node[part]
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, prefix: str = "") -> RecipeError:
    key = f"{prefix}{getattr(err, 'full_key', '') or ''}"
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        leaf = key.rsplit(".", 1)[-1]
        return RecipeError(f"{key}: unknown key; {_closest(leaf, _allowed_keys(schema, key[len(prefix):]))}")
    return RecipeError(f"{key}: {msg}")


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


def _check_purifiers(recipe: Recipe) -> list[Any]:
    from purify.purifiers import PURIFIERS

    built = []
    for i, entry in enumerate(recipe.purifiers):
        where = f"purifiers[{i}]"
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in PURIFIERS:
            close = difflib.get_close_matches(str(name), list(PURIFIERS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RecipeError(f"{where}.name: unknown purifier {name!r}; {hint}allowed: {', '.join(sorted(PURIFIERS))}")
        cfg = structured(PURIFIERS[name][0], entry, prefix=f"{where}.")
        check = getattr(cfg, "validate", None)
        if check is not None:
            try:
                check(recipe)
            except RecipeError as err:
                raise RecipeError(f"{where}.{err}") from None
        built.append(cfg)
    return built


def _check_source(spec: ModelSpec, where: str) -> None:
    sources = [k for k in ("path", "builtin", "config", "arch", "gguf", "cache") if getattr(spec, k) is not None]
    if len(sources) != 1:
        got = ", ".join(sources) or "none"
        raise RecipeError(f"{where}: give exactly one of path, builtin, config, arch, gguf, cache (got {got})")
    if spec.cache is not None:
        from purify.cache import check_cache_spec

        check_cache_spec(spec, where)
    if spec.config is not None and "model_type" not in spec.config:
        raise RecipeError(f"{where}.config: missing model_type; e.g. model_type: llama")
    if spec.config is not None and spec.tokenizer is None:
        raise RecipeError(f"{where}.tokenizer: a model built from `config` needs a tokenizer dir or builtin name")
    if spec.gguf is not None and not Path(spec.gguf).is_file():
        raise RecipeError(f"{where}.gguf: file not found: {spec.gguf}")
    if spec.path is not None and _looks_local(spec.path) and not Path(spec.path).exists():
        raise RecipeError(f"{where}.path: directory not found: {spec.path}")
    if spec.arch is not None:
        from purify.models import ARCHITECTURES

        if spec.arch not in ARCHITECTURES:
            raise RecipeError(f"{where}.arch: unknown architecture {spec.arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    if spec.builtin is not None:
        from purify.lm.bases import BASES

        if spec.builtin not in BASES:
            raise RecipeError(f"{where}.builtin: unknown base {spec.builtin!r}; allowed: {', '.join(BASES)}")


def _derive_batch_size(recipe: Recipe) -> None:
    """Set ``data.batch_size`` (per process) from ``data.global_batch_size``: the global batch over the world size
    (``trainer.devices × trainer.num_nodes``) and ``trainer.accumulate_grad_batches``, which must divide it."""
    from purify.strategy import check_global_batch, world_size

    t = recipe.trainer
    try:
        world = world_size(t.accelerator, t.devices, t.num_nodes)
    except (TypeError, ValueError):
        raise RecipeError(f"trainer.devices: cannot count processes for {t.devices!r}; give a count, a list of "
                          "device indices, 'auto' or -1") from None
    try:
        recipe.data.batch_size = check_global_batch(recipe.data.global_batch_size,  # type: ignore[arg-type]
                                                    world, t.accumulate_grad_batches)
    except ValueError as err:
        raise RecipeError(str(err)) from None


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep in path and path.count("/") != 1


def validate(recipe: Recipe) -> list[Any]:
    """Check a converted recipe; return the validated purifier configs. Raises RecipeError."""
    _check_source(recipe.student, "student")
    if not recipe.teachers:
        raise RecipeError("teachers: at least one teacher is needed")
    for i, teacher in enumerate(recipe.teachers):
        _check_source(teacher, f"teachers[{i}]")
    if sum(t.weight for t in recipe.teachers) <= 0 or any(t.weight < 0 for t in recipe.teachers):
        raise RecipeError("teachers[*].weight: weights must be >= 0 and sum to a positive number")
    data = recipe.data
    if data.train not in ("bundled", "noise") and not Path(data.train).is_file():
        raise RecipeError(f"data.train: file not found: {data.train}; give a .jsonl/.txt path, 'bundled' or 'noise'")
    if data.val is not None and not Path(data.val).is_file():
        raise RecipeError(f"data.val: file not found: {data.val}")
    if not 0.0 <= data.val_fraction < 1.0:
        raise RecipeError(f"data.val_fraction: {data.val_fraction} is not in [0, 1)")
    for key in ("max_length", "batch_size", "num_samples", "noise_dim"):
        if getattr(data, key) < 1:
            raise RecipeError(f"data.{key}: must be >= 1, got {getattr(data, key)}")
    if not 0.0 <= recipe.loss.beta <= 1.0:
        raise RecipeError(f"loss.beta: {recipe.loss.beta} is not in [0, 1]")
    if recipe.loss.temperature <= 0:
        raise RecipeError(f"loss.temperature: must be > 0, got {recipe.loss.temperature}")
    sl = recipe.loss.logit_slice
    if sl is not None and (len(sl) != 2 or not 0 <= sl[0] < sl[1]):
        raise RecipeError(f"loss.logit_slice: expected [start, stop) with 0 <= start < stop, got {list(sl)}")
    if recipe.optim.lr <= 0:
        raise RecipeError(f"optim.lr: must be > 0, got {recipe.optim.lr}")
    if recipe.trainer.max_steps < 1:
        raise RecipeError(f"trainer.max_steps: must be >= 1, got {recipe.trainer.max_steps}")
    if recipe.trainer.accumulate_grad_batches < 1:
        raise RecipeError("trainer.accumulate_grad_batches: must be >= 1")
    if data.global_batch_size is not None:
        _derive_batch_size(recipe)
    if recipe.strategy not in STRATEGIES:
        close = difflib.get_close_matches(recipe.strategy, STRATEGIES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecipeError(f"strategy: unknown strategy {recipe.strategy!r}; {hint}allowed: {', '.join(STRATEGIES)}")
    if recipe.resume is not None and not Path(recipe.resume).exists():  # a file, or a DeepSpeed checkpoint dir
        raise RecipeError(f"resume: checkpoint not found: {recipe.resume}")
    return _check_purifiers(recipe)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe, apply ``key=value`` dotlist overrides, convert and validate.

    Args:
        path: YAML file, or ``None`` for the defaults alone.
        overrides: omegaconf dotlist, e.g. ``["trainer.max_steps=20", "loss.name=jsd"]``.

    Raises:
        RecipeError: with the dotted key, the bad value and the allowed values.
    """
    schema = OmegaConf.structured(Recipe)
    layers: list[Any] = []
    if path is not None:
        if not Path(path).is_file():
            raise RecipeError(f"recipe: file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # yaml syntax errors
            raise RecipeError(f"recipe: cannot parse {path}: {str(err).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key=value (e.g. trainer.max_steps=20)")
    try:
        merged = OmegaConf.merge(schema, *layers)
        for item in overrides or []:  # update() also reaches into list items: purifiers.0.threshold=0.1
            key, value = item.split("=", 1)
            OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, schema) from None
    except (TypeError, ValueError, IndexError) as err:
        raise RecipeError(f"override: {str(err).splitlines()[0]}") from None
    validate(recipe)
    return recipe  # type: ignore[return-value]


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
