"""Recipes: shipped ones validate, overrides are typed, unknown fields and bad YAML are rejected clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qwerky.train.recipe import RecipeError, builtin_recipes, load_recipe


@pytest.mark.parametrize("name", builtin_recipes())
def test_builtin_recipes_load_and_validate(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.stage1.loss == "align" and recipe.stage2.loss == "kl"


BENCH_RECIPES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_RECIPES, ids=lambda p: p.name)
def test_benchmark_recipes_load_and_validate(path: Path) -> None:
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    assert recipe.stage1.loss == "align" and recipe.stage2.loss == "kl"


def test_builtins_present() -> None:
    assert {"default", "published", "long_context"} <= set(builtin_recipes())


def test_overrides_are_typed() -> None:
    r = load_recipe("default", ["stage2.tokens=2e5", "stage3.lr=3e-4", "student.attention_layers=1,3",
                                "train.tensorboard=true", "student.mixer=window"])
    assert r.stage2.tokens == 200000 and isinstance(r.stage2.tokens, int)
    assert r.stage3.lr == pytest.approx(3e-4)
    assert r.student.attention_layers == [1, 3]
    assert r.train.tensorboard is True and r.student.mixer == "window"
    opts = load_recipe("default", ["student.mixer=window", "student.mixer_options.branch_rope=true",
                                   "student.mixer_options.branch_decay_init=[-8,-2]"]).student.mixer_options
    assert opts == {"branch_rope": True, "branch_decay_init": [-8, -2]}  # the rest: the mixer's own defaults
    assert load_recipe("default").student.convert_kwargs()["mixer_options"] == {}
    # changing the mixer drops options written for the previous one; options set after it stay
    r = load_recipe("default", ["student.mixer=window", "student.mixer_options.window_size=32", "student.mixer=rwkv7"])
    assert r.student.mixer == "rwkv7" and r.student.mixer_options == {}


@pytest.mark.parametrize("item,needle", [
    ("stage2.tokenz=5", "unknown recipe field 'stage2.tokenz'"),
    ("stage9.tokens=5", "unknown recipe field 'stage9'"),
    ("stage2.tokens=many", "must be an integer"),
    ("stage2", "KEY=VALUE"),
    ("student.mixer=mamba", "unknown mixer 'mamba'; choose one of"),
    ("stage4.loss=mse", "stage4.loss must be"),
    ("student.mixer_options.window_size=8", "student.mixer_options: unknown option(s) window_size"),
    ("student.branch_rope=true", "'student.branch_rope' was moved to student.mixer_options.branch_rope"),
    ("stage2.kl_focus=0.5", "'stage2.kl_focus' was removed"),
    ("data.recall_fraction=2", "data.recall_fraction must be in [0, 1]"),
])
def test_bad_overrides(item: str, needle: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(needle)):
        load_recipe("default", [item])


@pytest.mark.parametrize("items,needle", [
    (["student.mixer=window", "student.mixer_options.branch_decay_init=[-3,-9]"], "branch_decay_init must be"),
    (["student.mixer=window", "student.mixer_options.branch_decay_init=[-3]"], "must have 2 entries"),
    (["student.mixer=window", "student.mixer_options.window_size=wide"], "window_size must be an integer"),
])
def test_bad_mixer_options(items: list[str], needle: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(needle)):
        load_recipe("default", items)


def test_recall_gap_must_fit_every_enabled_stage() -> None:
    ok = load_recipe("default", ["data.recall_fraction=0.25"])
    assert ok.data.recall_fraction == 0.25 and ok.data.recall_min_gap == 128
    with pytest.raises(RecipeError, match="recall_min_gap=480 does not fit stage1.seq_len=256"):
        load_recipe("default", ["data.recall_fraction=0.25", "data.recall_min_gap=480"])


def test_yaml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  tokens: [1, 2\n")
    with pytest.raises(RecipeError, match="malformed YAML.*line"):
        load_recipe(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("stage1:\n  tokenz: 5\n")
    with pytest.raises(RecipeError, match="unknown recipe field 'stage1.tokenz'"):
        load_recipe(str(unknown))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope")


@pytest.mark.parametrize(("raw", "word"), [("on", "on"), ("off", "off"), ("auto", "auto"), ("yes", "on")])
def test_on_off_words_survive_yaml_booleans(raw: str, word: str, tmp_path: Path) -> None:
    """YAML 1.1 reads a bare `on`/`off` as a boolean; a word-valued field must still get the word."""
    assert load_recipe("default", [f"train.activation_checkpointing={raw}"]).train.activation_checkpointing == word
    f = tmp_path / "r.yaml"
    f.write_text(f"train:\n  activation_checkpointing: {raw}\n")
    assert load_recipe(str(f)).train.activation_checkpointing == word


def test_scaled_token_overrides() -> None:
    from qwerky.train.recipe import scaled_token_overrides

    base = load_recipe("default")
    assert scaled_token_overrides(base, 1.0) == []
    scaled = load_recipe("default", scaled_token_overrides(base, 0.3))
    for i in (1, 2, 3, 4):
        assert scaled.stage(i).tokens == max(1, int(base.stage(i).tokens * 0.3))
        assert scaled.stage(i).seq_len == base.stage(i).seq_len


def test_every_recipe_field_is_typed_and_documented() -> None:
    """`--help-recipe` is only as good as the fields: each has a doc, and every choice field a Literal type."""
    from qwerky.train.recipe import describe_recipe

    rows = describe_recipe()
    assert {"stage2.tokens", "train.keep", "student.mixer_options", "data.eval_seq_len"} <= {r[0] for r in rows}
    undocumented = [name for name, _, _, doc in rows if not doc.strip()]
    assert undocumented == []
    kinds = {name: kind for name, kind, _, _ in rows}
    assert kinds["stage1.schedule"] == "'cosine' | 'constant'" and kinds["train.keep"] == "'best' | 'last'"
    assert kinds["stage3.tokens"] == "int" and kinds["student.attention_layers"] == "list[int]"


@pytest.mark.parametrize("item,needle", [
    ("train.keep=worst", "train.keep must be one of 'best', 'last', got 'worst'"),
    ("stage2.schedule=linear", "stage2.schedule must be one of 'cosine', 'constant'"),
    ("train.tensorboard=maybe", "train.tensorboard must be true or false"),
    ("stage2.tokens=1.5", "stage2.tokens must be an integer"),
    ("train.log_every=5", "'train.log_every' was removed"),
])
def test_choice_and_type_errors_name_the_field(item: str, needle: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(needle)):
        load_recipe("default", [item])


def test_recipe_and_mixer_options_share_one_coercer(tmp_path: Path) -> None:
    """The same spelling means the same value in a recipe field and in a mixer option (modeling/options.py)."""
    r = load_recipe("default", ["stage2.tokens=1e6", "train.tensorboard=yes"])
    assert r.stage2.tokens == 1_000_000 and r.train.tensorboard is True
    from qwerky.modeling.mixer_base import get_mixer

    opts = get_mixer("window").Options.parse({"window_size": "32", "branch_rope": "yes",
                                              "branch_decay_init": "-8,-2"})
    assert opts.window_size == 32 and opts.branch_rope is True and opts.branch_decay_init == (-8.0, -2.0)
    with pytest.raises(ValueError, match="window_size must be an integer"):
        get_mixer("window").Options.parse({"window_size": "1.5"})
    f = tmp_path / "r.yaml"
    f.write_text("stage2:\n  tokens: 2e5\ntrain:\n  keep: last\n")
    assert load_recipe(str(f)).stage2.tokens == 200_000


def test_validate_checks_values_set_from_python() -> None:
    from qwerky.train.recipe import validate

    r = load_recipe("default")
    r.train.precision = "fp16"  # type: ignore[assignment]
    with pytest.raises(RecipeError, match="train.precision must be one of 'auto', 'fp32', 'bf16'"):
        validate(r)


def test_help_recipe_lists_every_field(capsys: pytest.CaptureFixture) -> None:
    from qwerky.cli import main
    from qwerky.train.recipe import describe_recipe

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help-recipe"])  # no --teacher/--out needed
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, _, _, doc in describe_recipe():
        shown = name.replace("stage1.", "stageN.") if name.startswith("stage") else name
        if not name.startswith(("stage2.", "stage3.", "stage4.")):
            assert f"{shown} (" in out and doc in out, name
