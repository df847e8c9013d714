"""qwerky: turn a pretrained Hugging Face transformer into an attention-free RWKV model by distillation."""

__version__ = "0.1.0"
