"""Distillation: recipes, the four stages, the training loop, checkpoints, FSDP2, the main job."""

from .pipeline import ConvertJob, run_conversion
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["ConvertJob", "run_conversion", "Recipe", "RecipeError", "load_recipe"]
