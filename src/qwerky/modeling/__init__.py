"""The converted model's code. Every module here except this one is copied into exported folders.

QWERKY_MIXER_PATH (folders separated by os.pathsep) adds folders whose `mixer_*.py` files join this
package: a research mixer can live outside the source tree and still convert, train, export and serve.
"""

import os

from .configuration_qwerky import QwerkyConfig
from .modeling_qwerky import QwerkyForCausalLM
from .state_cache import QwerkyState

__path__ = [*__path__, *(p for p in os.environ.get("QWERKY_MIXER_PATH", "").split(os.pathsep) if p)]

__all__ = ["QwerkyConfig", "QwerkyForCausalLM", "QwerkyState"]
