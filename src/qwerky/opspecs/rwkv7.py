"""RWKV-7's forms (`qwerky.modeling.ops_rwkv7`) and inputs built like RAD-RWKV7's mixer builds them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qwerky.modeling import ops_rwkv7
from qwerky.opspecs import OpSpec

W_MIN = -math.exp(-0.5)  # RAD-RWKV7's lowest log-decay, -0.6065 (-LOG_DECAY_SCALE * sigmoid)


def make_inputs(B: int, T: int, H: int, K: int, V: int | None = None, *, decay: str | float = "random",
                seed: int = 0, state: bool = True, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """a = -kappa, b = kappa * iclr with kappa L2-normalised per head and iclr in (0, 1); log-decay in
    [W_MIN, 0]; r, k ~ N(0, 1/K). Drawn on the CPU, so every device sees the same values."""
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    kappa = F.normalize(rnd(B, T, H, K), dim=-1)
    iclr = torch.sigmoid(rnd(B, T, H, K))
    if decay == "random":
        w = W_MIN * torch.sigmoid(rnd(B, T, H, K))
    else:
        w = torch.full((B, T, H, K), 0.0 if decay == "slowest" else W_MIN if decay == "fastest" else float(decay))
    x = {"r": rnd(B, T, H, K) * K**-0.5, "w": w, "k": rnd(B, T, H, K) * K**-0.5, "v": rnd(B, T, H, V),
         "a": -kappa, "b": kappa * iclr}
    if state:
        x["s0"] = rnd(B, H, K, V) * 0.5
    return {n: t.to(device).requires_grad_(True) for n, t in x.items()}


SPEC = OpSpec(
    name="rwkv7",
    tensor_names=("r", "w", "k", "v", "a", "b"),
    time_tensors=("r", "w", "k", "v", "a", "b"),
    make_inputs=make_inputs,
    naive=ops_rwkv7.naive_recurrent_rwkv7,
    chunk=ops_rwkv7.chunk_rwkv7_torch,
    step=ops_rwkv7.recurrent_step_rwkv7,
    dispatch=ops_rwkv7.rwkv7_attention,
    module=ops_rwkv7,
    chunk_sizes=(16, 32, 64),  # 64 * |W_MIN| ~ 39 keeps exp() of the in-chunk decays within fp32
)
