"""Train the small Qwen2-architecture teacher that ships with qwerky (``qwerky demo`` converts it).

Steps, all deterministic from ``--seed``:

1. train a byte-level BPE tokenizer (``tokenizers``) on the training documents;
2. tokenise every document, append ``<|endoftext|>``, concatenate and pack into fixed-length sequences;
3. pre-train a ``transformers.Qwen2ForCausalLM`` (GQA, RoPE, q/k/v biases, tied embeddings) from scratch
   with AdamW and a warm-up + cosine schedule, in fp32 on the CPU;
4. report held-out perplexity and save model, tokenizer and ``training.json`` into ``--out``.

Run from the repository root (the defaults assume ``../shared/data`` beside the repo)::

    python scripts/train_teacher.py --measure-steps 5     # throughput only, saves nothing
    python scripts/train_teacher.py                       # 240 steps, deterministic from --seed

The shipped teacher was made with ``--time-budget 1260`` on a shared CPU: the cap stopped it after
233 of the 240 scheduled steps (see ``training.json``). To redo that run without a wall-clock cap
use ``--steps 240 --stop-at-step 233`` (same seed, one thread; not re-verified bit for bit).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=DEFAULT_DATA / "python-docs-train.jsonl.gz")
    p.add_argument("--validation", type=Path, default=DEFAULT_DATA / "python-docs-validation.jsonl.gz")
    p.add_argument("--out", type=Path, default=REPO / "src" / "qwerky" / "assets" / "teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (share the machine)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda trains under bf16 autocast)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this folder's tokenizer instead of training one (e.g. the embedded teacher's)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this teacher's weights (and tokenizer) instead of a random initialisation")
    p.add_argument("--retrieval-chars", type=int, nargs=2, default=[600, 7000], metavar=("MIN", "MAX"),
                   help="length range of a retrieval document's excerpt, in characters")
    p.add_argument("--retrieval-facts", type=int, default=1,
                   help="keys stated (and asked for) per retrieval document")
    p.add_argument("--retrieval-docs", type=int, default=0,
                   help="add this many synthetic retrieval documents (a key stated inside real text, asked for at "
                        "the end) so that the teacher learns in-context retrieval; 0 = plain corpus")
    p.add_argument("--copy-fraction", type=float, default=0.0,
                   help="fraction of each batch's rows replaced by copy rows (fresh random-token runs, each "
                        "written 4 times), e.g. 0.1, to keep the induction heads that --copy-warmup-steps grows; "
                        "a small teacher trained on text alone never gets them")
    p.add_argument("--copy-warmup-steps", type=int, default=0,
                   help="train the first N steps (of --steps) on copy rows alone, at min(seq_len, 128) tokens: "
                        "measured from the embedded teacher, induction heads broke out of the chance plateau "
                        "after about 850 such steps (use >= 1500); mixed in at --copy-fraction 0.25 (runs "
                        "written twice, then) they had not formed after 400 steps")
    p.add_argument("--mixture-out", type=Path, default=None,
                   help="write the training texts (synthetic documents included) here as .jsonl.gz, so that "
                        "distillation can use exactly the teacher's mixture")
    p.add_argument("--mixture-only", action="store_true",
                   help="write --mixture-out and exit (the mixture is deterministic from --seed and the corpus)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096)
    # model
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--max-position-embeddings", type=int, default=8192)
    # optimisation
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=240, help="optimizer steps (sets the cosine schedule)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--time-budget", type=float, default=0.0,
        help="optional safety cap in seconds (0 = none); stopping early makes the run non-deterministic",
    )
    p.add_argument(
        "--stop-at-step", type=int, default=0,
        help="if > 0: stop after this many steps while keeping the --steps schedule (deterministic)",
    )
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens to score (0 = all)")
    p.add_argument(
        "--measure-steps", type=int, default=0,
        help="if > 0: time this many training steps, print tokens/s and exit without saving",
    )
    return p.parse_args(argv)


def read_documents(path: Path) -> list[str]:
    """Texts of a ``{"id": ..., "text": ...}`` JSON-lines file (optionally gzipped), in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2/Qwen style) with the ChatML special tokens, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=8192,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


KEY_NAMES = ("pass key", "secret code", "magic number", "access number", "lucky number", "ticket number")


def retrieval_documents(texts: list[str], n: int, seed: int, min_chars: int = 600,
                        max_chars: int = 7000, facts: int = 1) -> list[str]:
    """Synthetic documents that teach in-context retrieval: a key stated at a random depth inside a real
    excerpt of the corpus, asked for at the end (the answer is the key). Several key names and two phrasings,
    so the teacher learns to look back, not one template. With `facts` > 1, that many keys (distinct names)
    are stated and all are asked for, in another order: more copying per document."""
    rng = random.Random(seed + 1)
    docs = []
    long_texts = [t for t in texts if len(t) > max_chars // 2]
    for _ in range(n):
        src = rng.choice(long_texts)
        size = rng.randint(min_chars, min(max_chars, len(src)))
        start = rng.randint(0, len(src) - size)
        body = src[start:start + size]
        if facts > 1:
            docs.append(_many_facts(body, rng, min(facts, len(KEY_NAMES))))
            continue
        name, key = rng.choice(KEY_NAMES), rng.randint(1, 50000)
        info = rng.choice((f"The {name} is {key}. Remember it. {key} is the {name}.",
                           f"Note: the {name} is {key}."))
        cut = _line_start(body, rng.randint(0, len(body)))
        docs.append(f"{body[:cut]}{info}\n{body[cut:]}\nWhat is the {name}? The {name} is {key}.")
    return docs


def _line_start(body: str, cut: int) -> int:
    nl = body.rfind("\n", 0, cut)
    return nl + 1 if nl >= 0 else cut


def _many_facts(body: str, rng: random.Random, facts: int) -> str:
    names = rng.sample(KEY_NAMES, facts)
    keys = [rng.randint(1, 50000) for _ in names]
    cuts = sorted(_line_start(body, rng.randint(0, len(body))) for _ in names)
    parts, last = [], 0
    for cut, name, key in zip(cuts, names, keys):
        parts += [body[last:cut], f"The {name} is {key}.\n"]
        last = cut
    parts.append(body[last:])
    order = rng.sample(range(facts), facts)
    questions = "".join(f"\nWhat is the {names[i]}? The {names[i]} is {keys[i]}." for i in order)
    return "".join(parts) + questions


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise, end every document with eos, concatenate and cut into ``[N, seq_len]`` (tail dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.bos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model


def batches(data: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs over the packed rows, each epoch in a fresh seeded order."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield data[order[i : i + batch_size]]


def copy_rows(n: int, seq_len: int, vocab_size: int, gen: torch.Generator, eos: int,
              min_run: int = 6, max_run: int = 24, copies: int = 4) -> torch.Tensor:
    """``[n, seq_len]`` rows of short random-token runs, each written ``copies`` times, then an eos.

    Every copy after the first can only be predicted by finding an earlier one, so these rows train the
    induction heads that copying (and so retrieval) needs. Measured from the embedded teacher on the CPU
    (docs/window_student.md): with runs of 6-24 tokens written 4 times, loss broke from chance (8.3) to 4.6
    within 1,000 steps; with runs of 8-127 tokens written twice it stayed at chance for 1,000 steps. Run
    lengths vary because a fixed offset is learned as a positional shortcut instead. Fresh runs every batch,
    so that they cannot be memorised."""
    rows = torch.full((n, seq_len), eos, dtype=torch.long)
    max_run = max(1, min(max_run, (seq_len - 1) // copies))
    min_run = min(min_run, max_run)
    for row in rows:
        pos = 0
        while pos < seq_len:
            run_len = int(torch.randint(min_run, max_run + 1, (1,), generator=gen))
            run = torch.randint(1, vocab_size, (run_len,), generator=gen)
            run = run.masked_fill(run == eos, eos + 1 if eos + 1 < vocab_size else eos - 1)
            block = torch.cat([run] * copies + [torch.tensor([eos])])[: seq_len - pos]
            row[pos : pos + len(block)] = block
            pos += len(block)
    return rows


def with_copy_rows(data: Iterator[torch.Tensor], fraction: float, vocab_size: int, eos: int,
                   seed: int) -> Iterator[torch.Tensor]:
    """Replace ``round(fraction * batch)`` rows of each batch (at least one when fraction > 0) by copy rows."""
    gen = torch.Generator().manual_seed(seed + 3)
    for x in data:
        n = max(1, round(fraction * len(x))) if fraction > 0 else 0
        if n:
            x = x.clone()
            x[:n] = copy_rows(n, x.shape[1], vocab_size, gen, eos)
        yield x


def with_copy_warmup(data: Iterator[torch.Tensor], steps: int, batch_size: int, seq_len: int, vocab_size: int,
                     eos: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of copy rows alone (``min(seq_len, 128)`` tokens: short runs need no more), then
    ``data``, which is not advanced during the warm-up."""
    gen = torch.Generator().manual_seed(seed + 4)
    for _ in range(steps):
        yield copy_rows(batch_size, min(seq_len, 128), vocab_size, gen, eos)
    yield from data


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); no weight decay on biases, norms and the (tied) embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token loss over the rows of ``data`` and the number of scored tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data[i : i + batch_size].to(next(model.parameters()).device)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count, count


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0.0 <= args.copy_fraction < 1.0:
        raise SystemExit(f"--copy-fraction must be in [0, 1), got {args.copy_fraction}")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    t0 = time.perf_counter()
    train_texts = read_documents(args.train)
    val_texts = read_documents(args.validation)
    if args.init_from is not None and args.tokenizer is None:
        args.tokenizer = args.init_from
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        args.vocab_size = len(tokenizer)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
    if args.retrieval_docs:
        train_texts = train_texts + retrieval_documents(train_texts, args.retrieval_docs, args.seed,
                                                        *args.retrieval_chars, facts=args.retrieval_facts)
        random.Random(args.seed).shuffle(train_texts)
    if args.mixture_out is not None:
        args.mixture_out.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(args.mixture_out, "wt", encoding="utf-8") as f:
            for i, text in enumerate(train_texts):
                f.write(json.dumps({"id": i, "text": text}) + "\n")
        if args.mixture_only:
            print(f"wrote {len(train_texts)} documents to {args.mixture_out}")
            return
    train = pack(train_texts, tokenizer, args.seq_len)
    val = pack(val_texts, tokenizer, args.seq_len)
    if args.eval_tokens > 0:
        val = val[: max(1, args.eval_tokens // args.seq_len)]
    print(
        f"{len(train_texts)} train / {len(val_texts)} validation documents; "
        f"{train.numel():,} / {val.numel():,} packed tokens; tokenizer {time.perf_counter() - t0:.1f}s"
    )

    if args.init_from is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(device)
    else:
        model = build_model(args, tokenizer).to(device)
    model.train()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Qwen2ForCausalLM: {n_params:,} parameters")
    optimizer = make_optimizer(model, args)
    tokens_seen = 0  # copy warm-up rows are shorter than --seq-len, so count what was trained on
    steps = args.measure_steps or args.steps

    data = batches(train, args.batch_size, args.seed)
    if args.copy_fraction:
        data = with_copy_rows(data, args.copy_fraction, len(tokenizer), tokenizer.eos_token_id, args.seed)
    if args.copy_warmup_steps:
        data = with_copy_warmup(data, args.copy_warmup_steps, args.batch_size, args.seq_len, len(tokenizer),
                                tokenizer.eos_token_id, args.seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x = next(data).to(device)
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        tokens_seen += x.numel()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        if args.stop_at_step and step + 1 >= args.stop_at_step:
            break
        if args.time_budget and elapsed > args.time_budget:
            print(f"time budget reached after {step + 1} steps")
            break
    train_time = time.perf_counter() - start
    steps_done = len(losses)
    print(f"{tokens_seen:,} tokens in {train_time:.0f}s ({tokens_seen / train_time:.0f} tokens/s)")
    if args.measure_steps:
        return

    final_train_loss = float(np.mean(losses[-20:]))
    val_loss, val_count = evaluate(model, val)
    val_ppl = math.exp(val_loss)
    print(f"final train loss {final_train_loss:.4f}; held-out loss {val_loss:.4f}, perplexity {val_ppl:.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to("cpu", dtype=getattr(torch, args.save_dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {
        "script": "scripts/train_teacher.py",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                 if k not in ("train", "validation", "out")},
        "data": {"train": args.train.name, "validation": args.validation.name,
                 "train_documents": len(train_texts), "validation_documents": len(val_texts),
                 "train_packed_tokens": train.numel(), "validation_scored_tokens": val_count},
        "model_config": model.config.to_dict(),
        "parameters": n_params,
        "steps": steps_done,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / train.numel(),
        "train_wall_time_s": round(train_time, 1),
        "total_wall_time_s": round(time.perf_counter() - t0, 1),
        "final_train_loss": round(final_train_loss, 4),
        "heldout_loss": round(val_loss, 4),
        "heldout_perplexity": round(val_ppl, 3),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "retrieval_docs": args.retrieval_docs,
        "copy_fraction": args.copy_fraction,
        "copy_warmup_steps": args.copy_warmup_steps,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
