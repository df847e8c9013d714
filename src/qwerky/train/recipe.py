"""Recipes: every knob of a conversion in one YAML file, overridable by dotted `--set` paths.

A recipe is a tree of typed dataclasses, one documented field per knob (`qwerky convert --help-recipe` prints
them); loading goes through the same coercer as the mixers' options (modeling/options.py), rejects unknown keys (a
typo must not silently fall back to a default), and `--set stage2.tokens=200000` overrides any leaf, type checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from qwerky.errors import QwerkyError
from qwerky.modeling.options import coerce, describe_options, field_hints, option, parse_options


class RecipeError(QwerkyError, ValueError):
    """A recipe file or override the user must fix."""


@dataclass
class StudentSpec:
    """What the student is: its mixer, and which layers stay the teacher's attention."""

    mixer: str = option("rwkv7", "a registered student mixer (`qwerky mixers` lists them and their options)")
    attention_layers: list[int] = option([], "hybrid: layers keeping the teacher's softmax attention, e.g. [3, 7]")
    mixer_options: dict[str, Any] = option({}, "the mixer's own options (its Options dataclass; `qwerky mixers`)")
    keep_attention: str = option("", "'auto:K': after stage 1 keep K layers as attention, chosen greedily on "
                                     "held-out KL")
    fit_output_scale: bool = option(True, "stage 0: scale each converted head's output to its attention's size "
                                          "(train/warm_start.py)")

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
    "train.log_every": "removed: every optimiser step is logged (it never took effect)",
}


@dataclass
class DataSpec:
    """How the text is split and what the held-out quality table is measured on."""

    heldout_fraction: float = option(0.02, "share of documents held out (when no --heldout files are given)")
    seed: int = option(0, "document split and batch order")
    eval_seq_len: int = option(512, "held-out window length of the quality report")
    eval_windows: int = option(32, "held-out windows evaluated")
    text_field: str = option("text", "field/column holding the text in jsonl, parquet and datasets folders")
    recall_fraction: float = option(0.0, "share of training rows whose passage is written again past the window")
    recall_min_gap: int = option(128, "recall rows: at least this many tokens between the passage and its copy")


@dataclass
class StageSpec:
    """One training stage: its budget, context, optimiser and loss."""

    enabled: bool = option(True, "run this stage")
    tokens: int = option(1_000_000, "training tokens (global: all ranks together)")
    seq_len: int = option(512, "training sequence length")
    batch_size: int = option(16, "global sequences per optimiser step")
    micro_batch_size: int = option(0, "per-rank sequences per forward (0: the whole local batch); gradients "
                                      "accumulate")
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-5, "final learning rate of the cosine schedule")
    warmup_steps: int = option(50, "linear warm-up steps")
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule after warm-up")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "max gradient norm (0: off)")
    loss: Literal["align", "kl", "ce"] = option("kl", "stage 1: align; stages 2-3: kl; stage 4: kl or ce")
    lora_rank: int = option(0, "stage 3: > 0 trains LoRA adapters on the MLPs instead of the full MLP weights")
    logits_chunk: int = option(128, "sequence positions per chunk of the vocabulary-sized KL")


@dataclass
class TrainSpec:
    """Run-wide training settings: precision, checkpoints, threads, and the stage guard."""

    seed: int = option(0, "initialisation and dropout RNG")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 autocast on CUDA, fp32 on CPU")
    activation_checkpointing: Literal["auto", "on", "off"] = option(
        "auto", "recompute layer activations in backward (auto: on with CUDA, on CPU when plan says memory needs it)")
    checkpoint_every: int = option(100, "optimiser steps between checkpoints (stage ends always checkpoint)")
    checkpoint_minutes: float = option(5.0, "also checkpoint when this long has passed since the last one (0: off)")
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk")
    threads: int = option(0, "torch CPU threads (0: chosen from the cores and the machine's load)")
    tensorboard: bool = option(False, "also write tensorboard scalars under RUN_DIR/tb")
    teacher_context: Literal["warn", "cap", "off"] = option(
        "warn", "a stage longer than the teacher's measured effective context: warn, cap its seq_len, or off")
    keep: Literal["best", "last"] = option(
        "best", "best: a stage that makes the student worse is undone (train/guard.py); last: only warned")
    guard_kl_tolerance: float = option(0.02, "relative KL rise a stage may cause before it counts as worse")
    guard_top1_tolerance: float = option(0.005, "top-1 agreement drop (0.005 = half a point) before it counts as "
                                                "worse")


@dataclass
class Recipe:
    """A whole conversion: the student, the data split, run-wide settings and the four stages."""

    name: str = option("custom", "the recipe's name (the file's stem when loaded from a file)")
    student: StudentSpec = option(StudentSpec(), "the student")
    data: DataSpec = option(DataSpec(), "data split and held-out evaluation")
    train: TrainSpec = option(TrainSpec(), "run-wide training settings")
    stage1: StageSpec = option(StageSpec(loss="align"), "each mixer against its own teacher attention's output")
    stage2: StageSpec = option(StageSpec(), "the whole model on the teacher's logits, only the mixers train")
    stage3: StageSpec = option(StageSpec(), "all layers (MLPs too) on the teacher's logits")
    stage4: StageSpec = option(StageSpec(), "all layers at a longer context")

    def stage(self, n: int) -> StageSpec:
        return getattr(self, f"stage{n}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_recipe() -> list[tuple[str, str, Any, str]]:
    """(dotted field, type, default, doc) of every recipe field, for `qwerky convert --help-recipe`."""
    return describe_options(Recipe)


def _unknown_field(path: str, valid: list[str]) -> str:
    if path in MOVED_FIELDS:
        return f"recipe field '{path}' was {MOVED_FIELDS[path]}"
    return f"unknown recipe field '{path}' (valid here: {', '.join(valid)})"


RECIPE_DIR = "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("qwerky").joinpath(RECIPE_DIR).iterdir()
                  if p.name.endswith(".yaml"))


def _build(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        return parse_options(Recipe, data, "", _unknown_field)
    except RecipeError:
        raise
    except ValueError as err:
        raise RecipeError(str(err)) from None


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
    recipe = _build(data)
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
    """Apply one `--set KEY=VALUE` (the value read as YAML, then coerced to the field's type)."""
    if "=" not in item:
        raise RecipeError(f"--set expects KEY=VALUE (e.g. stage2.tokens=200000), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() else raw
    target, leaf = _field_of(recipe, key)
    if isinstance(target, dict):  # a free mapping (student.mixer_options): checked by the mixer's Options in validate
        target[leaf] = value
        return
    try:
        value = coerce(value, field_hints(type(target))[leaf], key)
    except ValueError as err:
        raise RecipeError(f"--set: {err}") from None
    if target is recipe.student and leaf == "mixer" and value != recipe.student.mixer:
        recipe.student.mixer_options = {}  # options belong to the mixer they were written for
    setattr(target, leaf, value)


def _field_of(recipe: Recipe, key: str) -> tuple[Any, str]:
    """(the section or mapping holding `key`'s last part, that part), or a RecipeError naming the bad part."""
    parts = key.split(".")
    target: Any = recipe
    for i, part in enumerate(parts):
        if isinstance(target, dict):  # entries of a free mapping are created as given
            if i == len(parts) - 1:
                return target, part
            target = target.setdefault(part, {})
            continue
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:
            where = ".".join(parts[: i + 1])
            raise RecipeError(f"--set: {_unknown_field(where, names)}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(target, part)):
                raise RecipeError(f"--set: '{key}' is a section; set one of its fields")
            return target, part
        target = getattr(target, part)
    raise RecipeError(f"--set: empty field name in {key!r}")


def validate(recipe: Recipe) -> None:
    """Every field against its type (the same coercer: a value set from Python is checked too), then the rules
    that span fields."""
    from qwerky.data.recall import RecallRows
    from qwerky.modeling.mixer_base import get_mixer

    _build(recipe.to_dict())
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
        allowed = {1: ("align",), 2: ("kl",), 3: ("kl",), 4: ("kl", "ce")}[n]
        if s.loss not in allowed:
            raise RecipeError(f"stage{n}.loss must be {' or '.join(allowed)}, got '{s.loss}'")
        if s.lr <= 0:
            raise RecipeError(f"stage{n}.lr must be positive, got {s.lr}")
    if recipe.train.guard_kl_tolerance < 0 or recipe.train.guard_top1_tolerance < 0:
        raise RecipeError("train.guard_kl_tolerance and train.guard_top1_tolerance must be >= 0")

