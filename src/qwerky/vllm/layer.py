"""What every qwerky mixer layer for vLLM shares: the `MambaBase` state spec, the teacher's q/k/v/o on
vLLM's tensor-parallel linears, its q/k norms and RoPE, and the two custom ops that touch the state.

vLLM allocates and assigns each request's state (one or more tensors per layer, from `state_shapes` /
`state_dtypes`) exactly as for its own linear-attention layers, with the "linear_attention" metadata
backend (decodes first, then prefills, one state slot per request). A layer's projections and gating are
ordinary (compilable) PyTorch; only what reads or writes the state runs inside a custom op, which finds
the layer by name in the forward context (like vLLM's `linear_attention` op) and is a graph split point
for vLLM's compiler, so the per-request Python inside it is never captured in a CUDA graph:

- `vllm::qwerky_state_update(inputs, out, layer)` -> `layer.state_update(inputs, out, batch)`;
- `vllm::qwerky_token_shift(x, out, layer)` -> the previous token's input (RWKV token shift; the last
  input row per request is kept as the layer's second state tensor).

A new mixer subclasses `StateLayer` (`state_shapes` when its state is not S [H, D, D] plus, with
`shifts_tokens`, a token shift), `forward(positions, x, v_first) -> (out, v_first)`
and `state_update`, in a module named after the mixer (`qwerky/vllm/<mixer>.py`) whose `LAYER` is the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
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

from qwerky.vllm.ops import PackedBatch, token_shift_packed


def state_dtype(vllm_config: VllmConfig) -> torch.dtype:
    """Always fp32, whatever the weights' dtype: the state sums a whole context, and qwerky trains and tests
    it in fp32. An explicit other --mamba-ssm-cache-dtype is refused at load rather than ignored."""
    name = getattr(vllm_config.cache_config, "mamba_ssm_cache_dtype", "auto")
    if name not in (None, "auto", "float32"):
        raise ValueError(f"--mamba-ssm-cache-dtype {name}: qwerky students keep their recurrent state in float32 "
                         "(it accumulates the whole context; a 16-bit state is neither trained nor tested); "
                         "leave it at auto or float32. The weights follow --dtype.")
    return torch.float32


class LowRankTP(nn.Module):
    """qwerky's LowRank (x -> act(x A) B) with B's output sharded by head (A replicated); `sharded=False`
    replicates B too (outputs over the hidden size, e.g. RWKV-6's token-shift mixes)."""

    def __init__(self, dim_in: int, rank: int, dim_out: int, activation: str, prefix: str,
                 sharded: bool = True) -> None:
        super().__init__()
        self.down = ReplicatedLinear(dim_in, rank, bias=False, prefix=f"{prefix}.down")
        self.up = (ColumnParallelLinear(rank, dim_out, bias=False, gather_output=False, prefix=f"{prefix}.up")
                   if sharded else ReplicatedLinear(rank, dim_out, bias=False, prefix=f"{prefix}.up"))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.down(x)
        h = torch.tanh(h) if self.activation == "tanh" else torch.sigmoid(h) if self.activation == "sigmoid" else h
        out, _ = self.up(h)
        return out


def head_sharded(size: int, dtype: torch.dtype, *shape: int) -> nn.Parameter:
    """A per-channel parameter split by head over tensor-parallel ranks (dim 0)."""
    p = nn.Parameter(torch.empty(size, *shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(p, {"weight_loader": sharded_weight_loader(0)})
    return p


def replicated(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class StateLayer(nn.Module, MambaBase):
    """One converted layer: the teacher's projections (names as in the exported folder,
    `...self_attn.<name>`) plus the mixer's own parts, and a recurrent state owned by vLLM."""

    # fuse receptance/key/value into one QKVParallelLinear `rkv_proj` (same input for all three); mixers
    # with a token shift feed each its own shifted input, so they keep three linears
    fused_rkv: ClassVar[bool] = True
    # RWKV's token shift: each token also sees the previous token's input, kept as state tensor 1
    shifts_tokens: ClassVar[bool] = False
    # use the teacher's q/k/v/o biases and q/k norms (False: the mixer's graph has no place for them and
    # the exported tensors are skipped at load; see `unused_weights`)
    teacher_extras: ClassVar[bool] = True

    def __init__(self, config, layer_idx: int, first_layer: bool, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tc = config.teacher_config
        self.tp = tp = get_tensor_model_parallel_world_size()
        self.config, self.prefix, self.layer_idx, self.first_layer = config, prefix, layer_idx, first_layer
        self.vllm_config = vllm_config
        self.dtype = vllm_config.model_config.dtype
        C, H, Hk, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        if H % tp:
            raise ValueError(f"{config.mixer}: {H} heads do not split over tensor_parallel_size={tp}")
        if not self.fused_rkv and Hk % tp:
            raise ValueError(f"{config.mixer}: {Hk} key/value heads do not split over tensor_parallel_size={tp}")
        self.hidden_size, self.total_heads, self.head_dim = C, H, D
        self.num_heads, self.num_kv_heads = H // tp, max(1, Hk // tp)
        family = getattr(tc, "model_type", "")
        extras = self.teacher_extras
        qkv_bias = extras and (family == "qwen2" or bool(getattr(tc, "attention_bias", False)))
        o_bias = extras and family != "qwen2" and bool(getattr(tc, "attention_bias", False))
        if self.fused_rkv:
            self.rkv_proj = QKVParallelLinear(C, D, H, Hk, bias=qkv_bias, prefix=f"{prefix}.rkv_proj")
        else:
            self.receptance = ColumnParallelLinear(C, H * D, bias=qkv_bias, prefix=f"{prefix}.receptance")
            self.key = ColumnParallelLinear(C, Hk * D, bias=qkv_bias, prefix=f"{prefix}.key")
            self.value = ColumnParallelLinear(C, Hk * D, bias=qkv_bias, prefix=f"{prefix}.value")
        self.output = RowParallelLinear(H * D, C, bias=o_bias, input_is_parallel=True, prefix=f"{prefix}.output")
        eps = getattr(tc, "rms_norm_eps", 1e-6)
        norms = extras and config.has_qk_norm
        self.r_norm = RMSNorm(D, eps=eps) if norms else None
        self.k_norm = RMSNorm(D, eps=eps) if norms else None
        self.rotary_emb = None
        if config.use_rope:
            self.rotary_emb = get_rope(D, max_position=getattr(tc, "max_position_embeddings", 4096),
                                       is_neox_style=True, rope_parameters=getattr(tc, "rope_parameters", None))
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        self.backend = "auto"  # qwerky's kernel choice: fla on CUDA when installed, else PyTorch
        self.kv_cache = (torch.tensor([]),)
        ctx = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"duplicate layer name: {prefix}")
        ctx[prefix] = self

    # ----- the weights -----
    @classmethod
    def stacked_params(cls) -> list[tuple[str, str, str]]:
        """(parameter, exported name, shard) for weights loaded into a fused parameter."""
        if not cls.fused_rkv:
            return []
        return [("rkv_proj", "receptance", "q"), ("rkv_proj", "key", "k"), ("rkv_proj", "value", "v")]

    @classmethod
    def unused_weights(cls) -> tuple[str, ...]:
        """Suffixes (after `self_attn.`) of exported tensors this layer does not use."""
        if cls.teacher_extras:
            return ()
        return ("receptance.bias", "key.bias", "value.bias", "output.bias", "r_norm.weight", "k_norm.weight")

    # ----- the state spec vLLM allocates from -----
    @classmethod
    def state_shapes(cls, config, tp: int) -> tuple[tuple[int, ...], ...]:
        """The per-sequence state tensors of one layer on one tensor-parallel rank: the matrix state S
        [H, D, D] of the local heads, and the token shift's previous input [C] (whole row) if it shifts."""
        shapes: tuple[tuple[int, ...], ...] = ((config.num_heads // tp, config.head_dim, config.head_dim),)
        return shapes + ((config.hidden_size,),) if cls.shifts_tokens else shapes

    @classmethod
    def state_dtypes(cls, config, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        """Recurrent states in fp32 (or --mamba-ssm-cache-dtype); a token-shift row in the model's dtype."""
        dtypes: tuple[torch.dtype, ...] = (state_dtype(vllm_config),)
        return dtypes + (vllm_config.model_config.dtype,) if cls.shifts_tokens else dtypes

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return self.state_shapes(self.config, self.tp)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return self.state_dtypes(self.config, self.vllm_config)

    @classmethod
    def state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return cls.state_shapes(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    @classmethod
    def state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return cls.state_dtypes(vllm_config.model_config.hf_config, vllm_config)

    # ----- shared forward pieces -----
    def project(self, x_r: torch.Tensor, x_k: torch.Tensor | None = None, x_v: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r [N, H*D], k and v [N, Hk*D] (local heads), after the teacher's q/k norms; not rotated."""
        N, H, Hk, D = x_r.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.fused_rkv:
            rkv, _ = self.rkv_proj(x_r)
            r, k, v = rkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            r, k, v = self.receptance(x_r)[0], self.key(x_k)[0], self.value(x_v)[0]
        if self.r_norm is not None:
            r = self.r_norm(r.reshape(N, H, D)).reshape(N, -1)
            k = self.k_norm(k.reshape(N, Hk, D)).reshape(N, -1)
        return r, k, v

    def rotate(self, positions: torch.Tensor, r: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's RoPE on r [N, H*D] and k [N, Hk*D] (unchanged when the mixer uses none); new tensors:
        vLLM's CPU/CUDA rotary kernels rotate in place, and callers may still need the unrotated ones."""
        if self.rotary_emb is None:
            return r, k
        return self.rotary_emb(positions, r.clone(memory_format=torch.contiguous_format),
                               k.clone(memory_format=torch.contiguous_format))

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[N, Hk*D] -> [N, H, D]: GQA key/value heads repeated to the query heads."""
        N, H, Hk, D = t.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        return t.reshape(N, Hk, 1, D).expand(N, Hk, H // Hk, D).reshape(N, H, D)

    def rkv(self, positions: torch.Tensor, x_r: torch.Tensor, x_k: torch.Tensor | None = None,
            x_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r [N, H, D], k and v [N, H, D] (GQA heads repeated), after the teacher's q/k norms and RoPE."""
        r, k, v = self.project(x_r, x_k, x_v)
        r, k = self.rotate(positions, r, k)
        return r.reshape(r.shape[0], self.num_heads, self.head_dim), self.expand_kv(k), self.expand_kv(v)

    def token_shift(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C] -> the previous token's x per row (this layer's state tensor 1 carries it across steps)."""
        x_prev = torch.empty_like(x)
        torch.ops.vllm.qwerky_token_shift(x.contiguous(), x_prev, self.prefix)
        return x_prev

    def run_state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        torch.ops.vllm.qwerky_state_update([t.contiguous() for t in inputs], out, self.prefix)
        return out

    def state_update(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, batch: PackedBatch) -> None:
        """The mixer's recurrence over a packed batch (eager, inside the custom op): writes out[:num_tokens]
        and the request slots of `self.kv_cache`."""
        raise NotImplementedError

    def packed_batch(self) -> PackedBatch | None:
        """This step's request layout from vLLM's metadata, or None in profiling / dummy runs. Built once per
        forward pass (kept in vLLM's per-step forward context) and shared by every layer and op."""
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if isinstance(meta, dict):
            meta = meta.get(self.prefix)
        if meta is None:
            return None
        built: dict[int, PackedBatch] = ctx.__dict__.setdefault("_qwerky_batches", {})
        if id(meta) in built:
            return built[id(meta)]
        nd, npf = meta.num_decodes, meta.num_prefills
        qsl = meta.query_start_loc
        init = None
        if npf:
            q_lens = qsl[nd + 1:nd + npf + 1] - qsl[nd:nd + npf]
            init = (meta.seq_lens[nd:nd + npf] - q_lens) > 0  # a continued chunked prefill
        built[id(meta)] = batch = PackedBatch(nd, npf, qsl, meta.state_indices_tensor, init)
        return batch


def _state_update_op(inputs: list[torch.Tensor], out: torch.Tensor, layer_name: str) -> None:
    layer: StateLayer = get_forward_context().no_compile_layers[layer_name]
    batch = layer.packed_batch()
    if batch is None:  # profiling / dummy run: no state assigned
        out.zero_()
        return
    n = batch.num_tokens
    layer.state_update([t[:n] for t in inputs], out, batch)
    if out.shape[0] > n:
        out[n:] = 0


def _token_shift_op(x: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    layer: StateLayer = get_forward_context().no_compile_layers[layer_name]
    batch = layer.packed_batch()
    out.zero_()
    if batch is not None:
        n = batch.num_tokens
        out[:n] = token_shift_packed(x[:n], layer.kv_cache[1], batch)


def _state_update_fake(inputs: list[torch.Tensor], out: torch.Tensor, layer_name: str) -> None:
    return None


def _token_shift_fake(x: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


try:  # a graph-capture break point where this vLLM has one (eager segment inside a CUDA graph)
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture

    _state_update_op = eager_break_during_capture(_state_update_op)
    _token_shift_op = eager_break_during_capture(_token_shift_op)
except ImportError:  # pragma: no cover
    pass

if not hasattr(torch.ops.vllm, "qwerky_state_update"):
    direct_register_custom_op(op_name="qwerky_state_update", op_func=_state_update_op, mutates_args=["out"],
                              fake_impl=_state_update_fake)
if not hasattr(torch.ops.vllm, "qwerky_token_shift"):
    direct_register_custom_op(op_name="qwerky_token_shift", op_func=_token_shift_op, mutates_args=["out"],
                              fake_impl=_token_shift_fake)
