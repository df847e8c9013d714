"""Recipe overrides that make a conversion take seconds on a tiny teacher."""

TINY = [
    "stage1.tokens=1024", "stage1.batch_size=4", "stage1.seq_len=64", "stage1.warmup_steps=1",
    "stage2.tokens=1024", "stage2.batch_size=4", "stage2.seq_len=64", "stage2.warmup_steps=1",
    "stage3.tokens=1024", "stage3.batch_size=4", "stage3.seq_len=64", "stage3.warmup_steps=1",
    "stage4.tokens=1024", "stage4.batch_size=2", "stage4.seq_len=128", "stage4.warmup_steps=1",
    "data.eval_seq_len=64", "data.eval_windows=4", "train.threads=1",
]
