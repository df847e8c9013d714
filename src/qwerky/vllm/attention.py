"""A teacher attention layer that a hybrid student keeps (`config.attention_layers`), on vLLM's paged
`Attention`: the teacher's q/k/v (one QKVParallelLinear), q/k norms, RoPE and o_proj, its softmax scale.

With these layers the model is a vLLM hybrid (`IsHybrid`, like Jamba or Qwen3-Next): vLLM gives the kept
layers a paged KV cache and the converted layers their fixed-size state, from one memory pool.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope


class KeptAttention(nn.Module):
    """Weight names as exported (`...self_attn.q_proj` etc.); q/k/v load into `qkv_proj`."""

    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tc = config.teacher_config
        tp = get_tensor_model_parallel_world_size()
        C, H, Hk, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        if H % tp or (Hk >= tp and Hk % tp) or (Hk < tp and tp % Hk):
            raise ValueError(f"attention layer {layer_idx}: {H} heads / {Hk} key-value heads do not split over "
                             f"tensor_parallel_size={tp}")
        self.num_heads, self.num_kv_heads, self.head_dim = H // tp, max(1, Hk // tp), D
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        family = getattr(tc, "model_type", "")
        qkv_bias = family == "qwen2" or bool(getattr(tc, "attention_bias", False))
        o_bias = family != "qwen2" and bool(getattr(tc, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(C, D, H, Hk, bias=qkv_bias, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(H * D, C, bias=o_bias, input_is_parallel=True, prefix=f"{prefix}.o_proj")
        eps = getattr(tc, "rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(D, eps=eps) if config.has_qk_norm else None
        self.k_norm = RMSNorm(D, eps=eps) if config.has_qk_norm else None
        self.rotary_emb = get_rope(D, max_position=getattr(tc, "max_position_embeddings", 4096), is_neox_style=True,
                                   rope_parameters=getattr(tc, "rope_parameters", None))
        self.attn = Attention(self.num_heads, D, config.attention_scaling, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")
        backend = getattr(self.attn, "attn_backend", None)
        sizes = backend.get_supported_head_sizes() if hasattr(backend, "get_supported_head_sizes") else []
        if sizes and D not in sizes:  # else vLLM fails in the first forward, deep in its kernel
            raise ValueError(f"attention layer {layer_idx} (kept by the hybrid): head size {D} is not one vLLM's "
                             f"{backend.get_name()} attention backend supports ({', '.join(map(str, sizes))}); "
                             "serve this hybrid with `qwerky serve`, or convert without kept attention layers")

    @classmethod
    def stacked_params(cls) -> list[tuple[str, str, str]]:
        return [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        N = x.shape[0]
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(N, self.num_heads, self.head_dim)).reshape(N, -1)
            k = self.k_norm(k.reshape(N, self.num_kv_heads, self.head_dim)).reshape(N, -1)
        q, k = self.rotary_emb(positions, q.contiguous(), k.contiguous())
        out, _ = self.o_proj(self.attn(q, k, v))
        return out, v_first
