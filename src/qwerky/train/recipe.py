"""Recipes: every knob of a conversion in one YAML file, overridable by dotted `--set` paths.

A recipe is a tree of dataclasses; loading rejects unknown keys (a typo must not silently fall back to a
default) and `--set stage2.tokens=200000` overrides any leaf with its type checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe file or override the user must fix."""


@dataclass
class StudentSpec:
    mixer: str = "rwkv7"  # a registered student mixer (`qwerky mixers` lists them and their options)
    attention_layers: list[int] = field(default_factory=list)  # hybrid: layers keeping teacher attention
    mixer_options: dict[str, Any] = field(default_factory=dict)  # the mixer's own options (its Options dataclass)
    keep_attention: str = ""  # "auto:K": after stage 1 keep K layers as attention, chosen greedily on held-out KL
    fit_output_scale: bool = True  # stage 0: scale each converted head's output to its attention's (warm_start.py)

    def convert_kwargs(self) -> dict[str, Any]:
        """What convert_teacher needs to build this student."""
        return {"mixer": self.mixer, "attention_layers": self.attention_layers,
                "mixer_options": dict(self.mixer_options)}


# Fields that recipes once had: a clear word instead of "unknown field" for a recipe written before.
MOVED_FIELDS = {
    **{f"student.{k}": f"moved to student.mixer_options.{k}"
       for k in ("window_size", "num_sinks", "branch_rope", "branch_decay_init", "branch_center_keys")},
    "student.branch_own_qk": "removed: it measured as no gain (docs/window_student.md)",
    **{f"stage{n}.{k}": "removed: it measured as no gain (docs/window_student.md)"
       for n in (1, 2, 3, 4) for k in ("kl_focus", "gate_lr_scale")},
}


@dataclass
class DataSpec:
    heldout_fraction: float = 0.02  # share of documents held out (when no --heldout files are given)
    seed: int = 0  # document split and batch order
    eval_seq_len: int = 512  # held-out window length for the quality report
    eval_windows: int = 32  # held-out windows evaluated
    text_field: str = "text"  # field/column holding the text in jsonl/parquet/datasets
    recall_fraction: float = 0.0  # share of training rows whose passage is written again past the window
    recall_min_gap: int = 128  # recall rows: at least this many tokens between the passage and its copy


@dataclass
class StageSpec:
    enabled: bool = True  # run this stage
    tokens: int = 1_000_000  # training tokens (global, all ranks together)
    seq_len: int = 512  # training sequence length
    batch_size: int = 16  # global sequences per optimiser step
    micro_batch_size: int = 0  # per-rank sequences per forward (0: whole local batch); accumulates gradients
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5  # final learning rate of the cosine schedule
    warmup_steps: int = 50  # linear warm-up steps
    schedule: str = "cosine"  # cosine | constant
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0: off)
    loss: str = "kl"  # stage 1: align; stages 2-3: kl; stage 4: kl | ce
    lora_rank: int = 0  # stage 3: >0 trains LoRA adapters on the MLPs instead of full MLP weights
    logits_chunk: int = 128  # sequence positions per chunk of the vocabulary-sized KL


@dataclass
class TrainSpec:
    seed: int = 0  # initialisation and dropout RNG
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "auto"  # auto (on with CUDA) | on | off
    checkpoint_every: int = 100  # optimiser steps between checkpoints (stage ends always checkpoint)
    checkpoint_minutes: float = 5.0  # also checkpoint when this long has passed since the last one (0: off)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 1  # steps between JSONL log lines
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    tensorboard: bool = False  # also write tensorboard scalars under RUN_DIR/tb
    teacher_context: str = "warn"  # a stage longer than the teacher's measured effective context: warn | cap | off
    keep: str = "best"  # best: a stage that makes the student worse is undone (train/guard.py) | last: only warned
    guard_kl_tolerance: float = 0.02  # relative KL rise a stage may cause before it counts as worse
    guard_top1_tolerance: float = 0.005  # top-1 agreement drop (0.005 = half a point) before it counts as worse


@dataclass
class Recipe:
    name: str = "custom"
    student: StudentSpec = field(default_factory=StudentSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    stage1: StageSpec = field(default_factory=lambda: StageSpec(loss="align"))
    stage2: StageSpec = field(default_factory=StageSpec)
    stage3: StageSpec = field(default_factory=StageSpec)
    stage4: StageSpec = field(default_factory=StageSpec)

    def stage(self, n: int) -> StageSpec:
        return getattr(self, f"stage{n}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_DIR = "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("qwerky").joinpath(RECIPE_DIR).iterdir()
                  if p.name.endswith(".yaml"))


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"recipe field '{path or 'root'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            if where in MOVED_FIELDS:
                raise RecipeError(f"recipe field '{where}' was {MOVED_FIELDS[where]}")
            raise RecipeError(f"unknown recipe field '{where}' (valid here: {', '.join(fields)})")
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, where)
        else:
            kwargs[key] = _coerce(value, default, where)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise RecipeError(f"recipe field '{where}' must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"recipe field '{where}' must be an integer, got {value!r}")
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"recipe field '{where}' must be a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, int) and not isinstance(value, bool):  # `--set student.attention_layers=3`
            value = [value]
        if isinstance(value, str):
            value = [int(v) for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list):
            raise RecipeError(f"recipe field '{where}' must be a list, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe field '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(default, str):
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off/yes/no as a boolean; the field wants the word
            return "on" if value else "off"
        return str(value)
    return value


def load_recipe(name_or_path: str = "default", overrides: list[str] | None = None) -> Recipe:
    """A built-in recipe by name, or a YAML file by path, with `key.sub=value` overrides applied."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        text = path.read_text()
        source = str(path)
    else:
        if name_or_path not in builtin_recipes():
            raise RecipeError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(builtin_recipes())}; "
                              "or pass a path to a .yaml file)")
        text = resources.files("qwerky").joinpath(RECIPE_DIR, f"{name_or_path}.yaml").read_text()
        source = name_or_path
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"malformed YAML in recipe {source}{where}: {problem}") from None
    data.setdefault("name", path.stem if path.suffix else name_or_path)
    recipe = _build(Recipe, data, "")
    for item in overrides or []:
        apply_override(recipe, item)
    validate(recipe)
    return recipe


def scaled_token_overrides(recipe: Recipe, scale: float) -> list[str]:
    """`--set` overrides that multiply every stage's token budget by `scale` (quick or partial-budget runs)."""
    if scale == 1.0:
        return []
    return [f"stage{i}.tokens={max(1, int(recipe.stage(i).tokens * scale))}" for i in (1, 2, 3, 4)]


def apply_override(recipe: Recipe, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set expects KEY=VALUE (e.g. stage2.tokens=200000), got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    target: Any = recipe
    for i, part in enumerate(parts[:-1]):
        if isinstance(target, dict):  # a free mapping (student.mixer_options): its entries are set as given
            target = target.setdefault(part, {})
            continue
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            where = ".".join(parts[: i + 1])
            raise RecipeError(f"--set: recipe field '{where}' was {MOVED_FIELDS[where]}" if where in MOVED_FIELDS
                              else f"--set: unknown recipe field '{where}'")
        target = getattr(target, part)
    leaf = parts[-1]
    if isinstance(target, dict):
        target[leaf] = yaml.safe_load(raw) if raw.strip() else raw  # checked by the mixer's Options in validate
        return
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        if key.strip() in MOVED_FIELDS:
            raise RecipeError(f"--set: recipe field '{key.strip()}' was {MOVED_FIELDS[key.strip()]}")
        valid = ", ".join(f.name for f in dataclasses.fields(target)) if dataclasses.is_dataclass(target) else ""
        raise RecipeError(f"--set: unknown recipe field '{key}'" + (f" (valid here: {valid})" if valid else ""))
    current = getattr(target, leaf)
    if dataclasses.is_dataclass(current):
        raise RecipeError(f"--set: '{key}' is a section; set one of its fields")
    value = yaml.safe_load(raw) if raw.strip() else raw
    value = _coerce(value, current, key)
    if target is recipe.student and leaf == "mixer" and value != current:
        recipe.student.mixer_options = {}  # options belong to the mixer they were written for
    setattr(target, leaf, value)


def validate(recipe: Recipe) -> None:
    from qwerky.data.recall import RecallRows
    from qwerky.modeling.mixer_base import get_mixer

    try:
        get_mixer(recipe.student.mixer).Options.parse(recipe.student.mixer_options, where="student.mixer_options")
    except ValueError as err:
        raise RecipeError(f"student: {err}" if "unknown mixer" in str(err) else str(err)) from None
    from qwerky.train.hybrid import parse_keep_attention

    try:
        keep = parse_keep_attention(recipe.student.keep_attention)
    except ValueError as err:
        raise RecipeError(f"student.{err}") from None
    if keep is not None and recipe.student.attention_layers:
        raise RecipeError("student.keep_attention=auto:K chooses the attention layers itself; "
                          "drop student.attention_layers (or keep_attention)")
    d = recipe.data
    if not 0.0 <= d.recall_fraction <= 1.0:
        raise RecipeError(f"data.recall_fraction must be in [0, 1], got {d.recall_fraction}")
    if d.recall_fraction:
        for n in (1, 2, 3, 4):
            s = recipe.stage(n)
            need = RecallRows.tokens_needed(s.seq_len, d.recall_min_gap)
            if s.enabled and (d.recall_min_gap < 1 or need > s.seq_len):
                raise RecipeError(f"data.recall_min_gap={d.recall_min_gap} does not fit stage{n}.seq_len={s.seq_len} "
                                  f"(a recall row needs {need} tokens); lower the gap or set data.recall_fraction=0")
    for n in (1, 2, 3, 4):
        s = recipe.stage(n)
        for name in ("tokens", "seq_len", "batch_size"):
            if getattr(s, name) <= 0:
                raise RecipeError(f"stage{n}.{name} must be positive, got {getattr(s, name)}")
        if s.schedule not in ("cosine", "constant"):
            raise RecipeError(f"stage{n}.schedule must be cosine or constant, got '{s.schedule}'")
        allowed = {1: ("align",), 2: ("kl",), 3: ("kl",), 4: ("kl", "ce")}[n]
        if s.loss not in allowed:
            raise RecipeError(f"stage{n}.loss must be {' or '.join(allowed)}, got '{s.loss}'")
        if s.lr <= 0:
            raise RecipeError(f"stage{n}.lr must be positive, got {s.lr}")
    if recipe.train.teacher_context not in ("warn", "cap", "off"):
        raise RecipeError(f"train.teacher_context must be warn, cap or off, got '{recipe.train.teacher_context}'")
    if recipe.train.keep not in ("best", "last"):
        raise RecipeError(f"train.keep must be best or last, got '{recipe.train.keep}'")
    if recipe.train.guard_kl_tolerance < 0 or recipe.train.guard_top1_tolerance < 0:
        raise RecipeError("train.guard_kl_tolerance and train.guard_top1_tolerance must be >= 0")
    if recipe.train.precision not in ("auto", "fp32", "bf16"):
        raise RecipeError(f"train.precision must be auto, fp32 or bf16, got '{recipe.train.precision}'")
    ac = recipe.train.activation_checkpointing
    if ac not in ("auto", "on", "off"):
        raise RecipeError(f"train.activation_checkpointing must be auto, on or off, got '{ac}'")
