"""Recipes: shipped ones validate, overrides are typed, unknown fields and bad YAML are rejected clearly."""

from __future__ import annotations

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


@pytest.mark.parametrize("item,needle", [
    ("stage2.tokenz=5", "unknown recipe field 'stage2.tokenz'"),
    ("stage9.tokens=5", "unknown recipe field 'stage9'"),
    ("stage2.tokens=many", "must be an integer"),
    ("stage2", "KEY=VALUE"),
    ("student.mixer=mamba", "student.mixer must be one of"),
    ("stage4.loss=mse", "stage4.loss must be"),
])
def test_bad_overrides(item: str, needle: str) -> None:
    with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_recipe("default", [item])


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
