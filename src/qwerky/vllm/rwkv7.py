"""RAD-RWKV7 time-mix for vLLM: qwerky's `mixer_rwkv7.RWKV7Mixer` on vLLM's tensor-parallel layers.

The layer is a `MambaBase`: vLLM allocates and assigns its per-sequence state (the wkv state S
[H, D, D], fp32 by default) exactly as for its own linear-attention layers, from `get_state_shape` /
`get_state_dtype`, with the "linear_attention" metadata backend (decodes first, then prefills, one state
slot per request). Projections, LoRAs and gating are ordinary (compilable) PyTorch on vLLM's parallel
linears; only the state update runs inside the custom op `vllm::qwerky_rwkv7_recurrence`, which finds
this layer by name in the forward context, like vLLM's `linear_attention` op.

Tensor parallelism splits heads: r/k/v (QKVParallelLinear), the LoRA up-projections, the per-channel
base vectors and the state are sharded by head; the LoRA down-projections are replicated; the output
projection is a RowParallelLinear. The value residual (v_first: the first layer's values, per token)
travels through the model's forward beside the hidden states, so it is not part of the state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from qwerky.vllm.ops import rwkv7_packed

LOG_DECAY_SCALE = math.exp(-0.5)  # as qwerky.modeling.mixer_rwkv7


def state_dtype(vllm_config: VllmConfig) -> torch.dtype:
    """fp32 unless the user asked for another SSM-state dtype (--mamba-ssm-cache-dtype)."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    name = getattr(vllm_config.cache_config, "mamba_ssm_cache_dtype", "auto")
    return torch.float32 if name in (None, "auto") else STR_DTYPE_TO_TORCH_DTYPE[name]


class LowRankTP(nn.Module):
    """qwerky's LowRank (x -> act(x A) B) with B's output sharded by head (A replicated)."""

    def __init__(self, dim_in: int, rank: int, dim_out: int, activation: str, prefix: str) -> None:
        super().__init__()
        self.down = ReplicatedLinear(dim_in, rank, bias=False, prefix=f"{prefix}.down")
        self.up = ColumnParallelLinear(rank, dim_out, bias=False, gather_output=False, prefix=f"{prefix}.up")
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.down(x)
        h = torch.tanh(h) if self.activation == "tanh" else torch.sigmoid(h) if self.activation == "sigmoid" else h
        out, _ = self.up(h)
        return out


def _head_sharded(size: int, dtype: torch.dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
    set_weight_attrs(p, {"weight_loader": sharded_weight_loader(0)})
    return p


class RWKV7TimeMix(nn.Module, MambaBase):
    """One converted layer. Weight names follow the exported folder (`...self_attn.<name>`), except that
    receptance/key/value load into `rkv_proj` (see `stacked_params`)."""

    stacked_params = [("rkv_proj", "receptance", "q"), ("rkv_proj", "key", "k"), ("rkv_proj", "value", "v")]

    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tc = config.teacher_config
        tp = get_tensor_model_parallel_world_size()
        self.prefix, self.layer_idx, self.first_layer = prefix, layer_idx, first_layer
        self.vllm_config = vllm_config
        C, H, Hk, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        if H % tp:
            raise ValueError(f"rwkv7: {H} heads do not split over tensor_parallel_size={tp}")
        self.total_heads, self.head_dim = H, D
        self.num_heads = H // tp
        self.num_kv_heads = max(1, Hk // tp)
        family = getattr(tc, "model_type", "")
        qkv_bias = family == "qwen2" or bool(getattr(tc, "attention_bias", False))
        o_bias = family != "qwen2" and bool(getattr(tc, "attention_bias", False))
        self.rkv_proj = QKVParallelLinear(C, D, H, Hk, bias=qkv_bias, prefix=f"{prefix}.rkv_proj")
        self.output = RowParallelLinear(H * D, C, bias=o_bias, input_is_parallel=True, prefix=f"{prefix}.output")
        eps = getattr(tc, "rms_norm_eps", 1e-6)
        self.r_norm = RMSNorm(D, eps=eps) if config.has_qk_norm else None
        self.k_norm = RMSNorm(D, eps=eps) if config.has_qk_norm else None
        self.rotary_emb = None
        if config.use_rope:
            self.rotary_emb = get_rope(D, max_position=getattr(tc, "max_position_embeddings", 4096),
                                       is_neox_style=True, rope_parameters=getattr(tc, "rope_parameters", None))
        dtype = vllm_config.model_config.dtype
        HD = self.num_heads * D
        self.decay_base = _head_sharded(HD, dtype)
        self.decay_lora = LowRankTP(C, config.decay_rank, H * D, "tanh", f"{prefix}.decay_lora")
        self.iclr_base = _head_sharded(HD, dtype)
        self.iclr_lora = LowRankTP(C, config.iclr_rank, H * D, "none", f"{prefix}.iclr_lora")
        if not first_layer:
            self.value_mix_base = _head_sharded(HD, dtype)
            self.value_mix_lora = LowRankTP(C, config.value_rank, H * D, "none", f"{prefix}.value_mix_lora")
        self.gate_lora = LowRankTP(C, config.gate_rank, H * D, "sigmoid", f"{prefix}.gate_lora")
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        self.tp_rank = get_tensor_model_parallel_rank()
        self.backend = "auto"  # qwerky's kernel choice: fla on CUDA when installed, else PyTorch
        self.kv_cache = (torch.tensor([]),)
        ctx = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"duplicate layer name: {prefix}")
        ctx[prefix] = self

    # ----- the state spec vLLM allocates from -----
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, int, int]]:
        return ((self.num_heads, self.head_dim, self.head_dim),)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (state_dtype(self.vllm_config),)

    @classmethod
    def state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int, int]]:
        cfg = vllm_config.model_config.hf_config
        tp = vllm_config.parallel_config.tensor_parallel_size
        return ((cfg.num_heads // tp, cfg.head_dim, cfg.head_dim),)

    @classmethod
    def state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return (state_dtype(vllm_config),)

    # ----- forward -----
    def forward(self, positions: torch.Tensor, x: torch.Tensor, v_first: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C] -> (output [N, C], v_first [N, H_local * D])."""
        N = x.shape[0]
        H, D = self.num_heads, self.head_dim
        rkv, _ = self.rkv_proj(x)
        r, k, v = rkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.r_norm is not None:
            r = self.r_norm(r.reshape(N, H, D)).reshape(N, -1)
            k = self.k_norm(k.reshape(N, self.num_kv_heads, D)).reshape(N, -1)
        if self.rotary_emb is not None:
            r, k = self.rotary_emb(positions, r, k)
        n_rep = H // self.num_kv_heads
        k = k.reshape(N, self.num_kv_heads, 1, D).expand(N, self.num_kv_heads, n_rep, D).reshape(N, H, D)
        v = v.reshape(N, self.num_kv_heads, 1, D).expand(N, self.num_kv_heads, n_rep, D).reshape(N, H * D)
        if self.first_layer or v_first is None:
            v_first = v
        else:
            mix = torch.sigmoid(self.value_mix_base + self.value_mix_lora(x))
            v = v + (v_first - v) * mix
        log_w = (-LOG_DECAY_SCALE * torch.sigmoid(self.decay_base + self.decay_lora(x))).view(N, H, D)
        a = torch.sigmoid(self.iclr_base + self.iclr_lora(x)).view(N, H, D)
        kappa = F.normalize(k.float(), dim=-1).to(k.dtype)
        k_in = k * (1 - log_w.exp() + a)
        r = r.reshape(N, H, D)
        y = torch.empty(N, H, D, dtype=v.dtype, device=v.device)
        torch.ops.vllm.qwerky_rwkv7_recurrence(r.contiguous(), log_w.contiguous(), k_in.contiguous(),
                                               v.reshape(N, H, D).contiguous(), (-kappa).contiguous(),
                                               (kappa * a).contiguous(), y, self.prefix)
        y = y.reshape(N, H * D) * (1 + self.gate_lora(x))
        out, _ = self.output(y)
        return out, v_first

    def recurrence(self, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, out: torch.Tensor) -> None:
        """The state update over vLLM's packed batch (runs eagerly inside the custom op)."""
        meta = get_forward_context().attn_metadata
        if isinstance(meta, dict):
            meta = meta.get(self.prefix)
        if meta is None:  # profiling / dummy run: no state assigned
            out.zero_()
            return
        nd, npf = meta.num_decodes, meta.num_prefills
        n = meta.num_decode_tokens + meta.num_prefill_tokens
        qsl = meta.query_start_loc
        init = None
        if npf:
            q_lens = qsl[nd + 1:nd + npf + 1] - qsl[nd:nd + npf]
            init = (meta.seq_lens[nd:nd + npf] - q_lens) > 0  # continued chunked prefill
        o = rwkv7_packed(r[:n], w[:n], k[:n], v[:n], a[:n], b[:n], self.kv_cache[0], meta.state_indices_tensor,
                         qsl, init, nd, npf, scale=self.head_dim**-0.5, backend=self.backend)
        out[:n] = o
        if out.shape[0] > n:
            out[n:] = 0


def _recurrence_op(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    layer = get_forward_context().no_compile_layers[layer_name]
    layer.recurrence(r, w, k, v, a, b, out)


def _recurrence_fake(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


try:  # a graph-capture break point where this vLLM has one (eager segment inside a CUDA graph)
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture

    _recurrence_op = eager_break_during_capture(_recurrence_op)
except ImportError:  # pragma: no cover
    pass

if not hasattr(torch.ops.vllm, "qwerky_rwkv7_recurrence"):
    direct_register_custom_op(op_name="qwerky_rwkv7_recurrence", op_func=_recurrence_op, mutates_args=["out"],
                              fake_impl=_recurrence_fake)
