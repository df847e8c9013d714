"""The converted model's code. Every module here except this one is copied into exported folders."""

from .configuration_qwerky import QwerkyConfig
from .modeling_qwerky import QwerkyForCausalLM
from .state_cache import QwerkyState

__all__ = ["QwerkyConfig", "QwerkyForCausalLM", "QwerkyState"]
