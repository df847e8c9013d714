"""QwerkyForCausalLM: a teacher decoder whose attention blocks were replaced by RWKV mixers.

The teacher's own base model (embeddings, decoder layers with MLPs and norms, final norm, rotary
embedding) is built from its config with transformers, so every HF decoder family keeps its exact
layer code; only the attention module of each decoder layer is swapped for a qwerky mixer. The
recurrent state travels beside the teacher's forward in a shared ForwardContext rather than through
transformers' KV-cache classes, so memory per sequence stays fixed whatever the context length.

Which mixer replaces attention is the config's `mixer`, looked up in the registry of `mixer_base`.

Copied into every exported model folder (with its sibling modules): imports nothing from qwerky.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_qwerky import QwerkyConfig
from .layers_common import finalize_logits
from .mixer_attention import AttentionMixer
from .mixer_base import ForwardContext, Mixer, get_mixer
from .state_cache import QwerkyState

ATTENTION_IMPLEMENTATION = "qwerky"


def _teacher_attention_is_replaced(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a teacher attention kernel was called inside a qwerky model; every attention module "
                       "should have been replaced by a mixer")


# The teacher's base model runs under this attention implementation: no kernel of the teacher is ever
# called, and transformers builds no T x T mask for it (it knows no mask function by this name).
AttentionInterface.register(ATTENTION_IMPLEMENTATION, _teacher_attention_is_replaced)


def find_decoder_layers(base_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder layers (named `layers` in every llama-like family)."""
    layers = getattr(base_model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
        return layers
    for _, module in base_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"no list of {num_layers} decoder layers found in {type(base_model).__name__}")


class QwerkyPreTrainedModel(PreTrainedModel):
    config_class = QwerkyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        # Weights come from the teacher (surgery) or from a checkpoint; new mixer parameters get their values
        # from each mixer's reset_new_parameters (called once the model is built). Nothing to do here.
        return


class QwerkyForCausalLM(QwerkyPreTrainedModel, GenerationMixin):
    """A converted model: the teacher's base model with mixers in place of attention, and its LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # used when tie_word_embeddings

    def __init__(self, config: QwerkyConfig) -> None:
        super().__init__(config)
        teacher_config = config.teacher_config
        teacher_config._attn_implementation = ATTENTION_IMPLEMENTATION
        self.model = AutoModel.from_config(teacher_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.ctx = ForwardContext()
        self.mixers: list[Mixer] = []  # plain list: the modules are registered inside the decoder layers
        mixer_cls = get_mixer(config.mixer)
        options = mixer_cls.Options.parse(config.mixer_options, where=f"{config.mixer} mixer_options")
        layers = find_decoder_layers(self.model, config.num_hidden_layers)
        first_recurrent = next((i for i in range(len(layers)) if i not in config.attention_layers), None)
        for i, layer in enumerate(layers):
            attention = getattr(layer, config.attention_name)
            cls = AttentionMixer if i in config.attention_layers else mixer_cls
            mixer = cls(config, i, attention, first_layer=i == first_recurrent, options=options)
            mixer.reset_new_parameters()
            mixer.ctx = self.ctx
            setattr(layer, config.attention_name, mixer)
            self.mixers.append(mixer)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is a QwerkyState, created in prepare_inputs_for_generation

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def init_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> QwerkyState:
        """An empty state for `batch_size` sequences; its size never grows for recurrent/window layers."""
        device = device or self.lm_head.weight.device
        layers = [m.init_state(batch_size, device) for m in self.mixers]
        return QwerkyState(layers, torch.zeros(batch_size, dtype=torch.long, device=device),
                           pad_values=[m.state_pad_values for m in self.mixers])

    def set_backend(self, backend: str) -> None:
        """"auto" (fla on CUDA when installed), "fla", "torch" or "naive" for the recurrent kernels."""
        self.ctx.backend = backend

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: QwerkyState | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Parallel form over the whole input, continuing from `past_key_values` when given.

        attention_mask (optional, [B, T] or [B, past + T]) marks padding with 0; padded tokens leave the
        state untouched and do not count as positions, so left-padded batches give the same result as
        each row alone.
        """
        state = past_key_values if isinstance(past_key_values, QwerkyState) else None
        ref = input_ids if input_ids is not None else inputs_embeds
        if state is None and use_cache and ref is not None:
            state = self.init_state(ref.shape[0], ref.device)
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    state=state, **kwargs)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.logits(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=state)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head with the teacher family's own post-processing (logit scale, softcapping)."""
        return finalize_logits(self.config.teacher_config, self.lm_head(hidden))

    def hidden_states(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, state: QwerkyState | None = None,
                      **kwargs: Any) -> torch.Tensor:
        """Final hidden states [B, T, C] (before the LM head); continues from and updates `state` if given."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        B, T = ref.shape[:2]
        device = ref.device
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
        start = state.position if state is not None else torch.zeros(B, dtype=torch.long, device=device)
        if mask is None:
            positions = start[:, None] + torch.arange(T, device=device)[None]
        else:
            positions = (start[:, None] + mask.long().cumsum(1) - 1).masked_fill(~mask, -1)
        ctx = self.ctx
        # v_first stays set after the pass: activation checkpointing recomputes layers during backward
        ctx.state, ctx.token_mask, ctx.positions, ctx.v_first = state, mask, positions, None
        try:
            hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions.clamp(min=0),
                                use_cache=False, **_passthrough(kwargs)).last_hidden_state
        finally:
            ctx.state, ctx.token_mask = None, None
        if state is not None:
            state.position = start + (T if mask is None else mask.long().sum(1))
            state.seen += T
        return hidden

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, past_key_values: QwerkyState | None = None,
        attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the columns the state has not consumed yet; create the state on the first call."""
        if not isinstance(past_key_values, QwerkyState):
            past_key_values = self.init_state(input_ids.shape[0], input_ids.device)
        seen = past_key_values.seen
        inputs: dict[str, Any] = {"past_key_values": past_key_values, "use_cache": True,
                                  "attention_mask": attention_mask}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        return inputs

    def _reorder_cache(self, past_key_values: QwerkyState, beam_idx: torch.Tensor) -> QwerkyState:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


def _passthrough(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments that are safe to hand to the teacher's base model."""
    dropped = {"cache_position", "return_dict", "output_attentions", "num_items_in_batch", "next_sequence_length"}
    return {k: v for k, v in kwargs.items() if k not in dropped}


__all__ = ["QwerkyForCausalLM", "QwerkyPreTrainedModel", "QwerkyConfig", "QwerkyState"]
