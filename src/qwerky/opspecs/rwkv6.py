"""RWKV-6's forms (`qwerky.modeling.ops_rwkv6`) and inputs in RAD-RWKV6's ranges."""

from __future__ import annotations

import torch

from qwerky.modeling import ops_rwkv6
from qwerky.opspecs import OpSpec

W_MIN = -5.0  # RAD-RWKV6 clamps its log-decay here (MIN_LOG_DECAY)


def make_inputs(B: int, T: int, H: int, K: int, V: int | None = None, *, decay: str | float = "random",
                seed: int = 0, state: bool = True, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Log-decay spread over [W_MIN, 0] (sigmoid of 2x: many near both ends); a random bonus u [H, K], the
    general case of RAD-RWKV6's u = 1; r, k ~ N(0, 1/K). Drawn on the CPU: every device sees the same values."""
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if decay == "random":
        w = W_MIN * torch.sigmoid(rnd(B, T, H, K) * 2)
    else:
        w = torch.full((B, T, H, K), 0.0 if decay == "slowest" else W_MIN if decay == "fastest" else float(decay))
    x = {"r": rnd(B, T, H, K) * K**-0.5, "k": rnd(B, T, H, K) * K**-0.5, "v": rnd(B, T, H, V), "w": w,
         "u": rnd(H, K)}
    if state:
        x["s0"] = rnd(B, H, K, V) * 0.5
    return {n: t.to(device).requires_grad_(True) for n, t in x.items()}


SPEC = OpSpec(
    name="rwkv6",
    tensor_names=("r", "k", "v", "w", "u"),
    time_tensors=("r", "k", "v", "w"),
    make_inputs=make_inputs,
    naive=ops_rwkv6.naive_recurrent_rwkv6,
    chunk=ops_rwkv6.chunk_rwkv6_torch,
    step=ops_rwkv6.recurrent_step_rwkv6,
    dispatch=ops_rwkv6.rwkv6_attention,
    module=ops_rwkv6,
    # decays are taken relative to the chunk's middle: exp(C / 2 * |W_MIN|) must stay within fp32, so C <= 16
    chunk_sizes=(8, 16),
)
