"""Gated DeltaNet's forms (`qwerky.modeling.ops_gated_deltanet`) and inputs built like the mixer builds them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwerky.modeling import ops_gated_deltanet
from qwerky.opspecs import OpSpec

G_MIN = -5.0  # the mixer keeps the per-token log-decay in [G_MIN, 0]


def make_inputs(B: int, T: int, H: int, K: int, V: int | None = None, *, decay: str | float = "random",
                seed: int = 0, state: bool = True, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """q, k L2-normalised per head (the op expects it), beta = sigmoid(randn), one log-decay per head and token
    spread over [G_MIN, 0] (sigmoid of 2x: many near both ends). Drawn on the CPU: every device sees the same values."""
    V = K if V is None else V
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if decay == "random":
        g = G_MIN * torch.sigmoid(rnd(B, T, H) * 2)
    else:
        g = torch.full((B, T, H), 0.0 if decay == "slowest" else G_MIN if decay == "fastest" else float(decay))
    x = {"q": F.normalize(rnd(B, T, H, K), dim=-1), "k": F.normalize(rnd(B, T, H, K), dim=-1),
         "v": rnd(B, T, H, V), "g": g, "beta": torch.sigmoid(rnd(B, T, H))}
    if state:
        x["s0"] = rnd(B, H, K, V) * 0.5
    return {n: t.to(device).requires_grad_(True) for n, t in x.items()}


SPEC = OpSpec(
    name="gated_deltanet",
    tensor_names=("q", "k", "v", "g", "beta"),
    time_tensors=("q", "k", "v", "g", "beta"),
    make_inputs=make_inputs,
    naive=ops_gated_deltanet.naive_recurrent_gated_delta_rule,
    chunk=ops_gated_deltanet.chunk_gated_delta_rule_torch,
    step=ops_gated_deltanet.recurrent_step_gated_delta_rule,
    dispatch=ops_gated_deltanet.gated_delta_rule,
    module=ops_gated_deltanet,
    chunk_sizes=(16, 32, 64),  # in-chunk decays are masked cumulative sums of g <= 0: any size is stable
)
