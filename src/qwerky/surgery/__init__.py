"""Model surgery: teacher -> student conversion and the exported HF folder format."""

from .calibrate import calibrate_mixers
from .convert import convert_teacher, unshare_from_teacher
from .export import load_student, save_student
from .families import UnsupportedArchitectureError, inspect_teacher

__all__ = ["calibrate_mixers", "convert_teacher", "unshare_from_teacher", "save_student", "load_student",
           "UnsupportedArchitectureError", "inspect_teacher"]
