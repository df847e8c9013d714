"""Small pieces shared by the mixers: RoPE application, GQA head expansion, low-rank adapters.

Copied into every exported model folder: imports nothing from qwerky.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as HF decoders apply it, on [B, T, H, D]; cos/sin are [B, T, R] with R <= D (partial rotary)."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def family_rope(attention: nn.Module) -> RopeFn | None:
    """The teacher family's own `apply_rotary_pos_emb` (interleaved or partial rotary stay exact), if any."""
    module = inspect.getmodule(type(attention))
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        return None
    params = list(inspect.signature(fn).parameters)
    return fn if params[:4] == ["q", "k", "cos", "sin"] else None


def rotate_qk(q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
              family_fn: RopeFn | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to q [B, T, H, D] and k [B, T, Hk, D] exactly as the teacher does."""
    cos, sin = position_embeddings
    if family_fn is None:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rot = cos.shape[-1]
    if rot < q.shape[-1]:  # partial rotary: rotate the first `rot` dims, pass the rest (StableLM, Phi)
        q2, k2 = rotate_qk(q[..., :rot], k[..., :rot], position_embeddings, family_fn)
        return torch.cat([q2, q[..., rot:]], -1), torch.cat([k2, k[..., rot:]], -1)
    q2, k2 = family_fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # HF layout [B, H, T, D]
    return q2.transpose(1, 2), k2.transpose(1, 2)


def finalize_logits(config: object, logits: torch.Tensor) -> torch.Tensor:
    """Family-specific logit post-processing of HF heads: Cohere's scale, Granite's divisor, Gemma's softcap."""
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, T, Hk, D] -> [B, T, Hk * n_rep, D], each key/value head repeated for its query group."""
    if n_rep == 1:
        return x
    B, T, Hk, D = x.shape
    return x[:, :, :, None, :].expand(B, T, Hk, n_rep, D).reshape(B, T, Hk * n_rep, D)


class LowRank(nn.Module):
    """x -> act(x A) B; B starts at zero so a freshly added adapter has no effect."""

    def __init__(self, dim_in: int, rank: int, dim_out: int, activation: str = "tanh") -> None:
        super().__init__()
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)
        self.activation = activation
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.down.weight, std=self.down.in_features**-0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        h = torch.tanh(h) if self.activation == "tanh" else torch.sigmoid(h) if self.activation == "sigmoid" else h
        return self.up(h)


def take_projections(mixer: nn.Module, attention: nn.Module) -> None:
    """Stage-0 weight transfer: q->receptance, k->key, v->value, o->output, q/k norms -> r/k norms (modules
    taken over as they are, biases included; GQA key/value keep their head count)."""
    mixer.receptance = attention.q_proj
    mixer.key = attention.k_proj
    mixer.value = attention.v_proj
    mixer.output = getattr(attention, "o_proj", None) or attention.dense
    mixer.r_norm = getattr(attention, "q_norm", None)
    mixer.k_norm = getattr(attention, "k_norm", None)


def head_norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Apply a teacher q/k norm: per head when its weight is head-sized, over all heads otherwise (OLMo2)."""
    if norm is None:
        return x
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape[-1] != x.shape[-1]:
        B, T, H, D = x.shape
        return norm(x.reshape(B, T, H * D)).reshape(B, T, H, D)
    return norm(x)
