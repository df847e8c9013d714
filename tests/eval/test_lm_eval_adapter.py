"""The lm-eval adapter: offline local tasks of every request type on a tiny converted model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qwerky.eval.lm_eval_adapter import QwerkyLM  # noqa: E402

QUESTIONS = [
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog.", " state.", " key"], "label": 0},
    {"question": "A recurrent model keeps a fixed-size", "choices": [" state.", " dog", " Python lists"], "label": 0},
    {"question": "The pass key is", "choices": [" 12345.", " green.", " blue"], "label": 0},
]


def _write_tasks(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    gen = [{"question": "What is the pass key? The pass key is", "answer": " 12345"},
           {"question": "def add(a, b):", "answer": " return a + b"}]
    (data / "gen.jsonl").write_text("".join(json.dumps(q) + "\n" for q in gen))
    texts = [{"text": "The quick brown fox jumps over the lazy dog. " * 6}]
    (data / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(f"""task: qwerky_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (tasks / "gen.yaml").write_text(f"""task: qwerky_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")
    (tasks / "ppl.yaml").write_text(f"""task: qwerky_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return tasks


def _ref_loglik(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = model(ids).logits[0, :-1].float().log_softmax(-1)
    return float(lp[len(ctx) - 1:].gather(-1, torch.tensor(cont)[:, None]).sum())


def test_simple_evaluate_local_tasks(tiny_models, tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, student, _ = tiny_models
    tasks = _write_tasks(tmp_path)
    lm = QwerkyLM(student, tokenizer=tokenizer, batch_size=2, segment_len=16, max_gen_toks=8)
    out = simple_evaluate(model=lm, tasks=["qwerky_tiny_mc", "qwerky_tiny_gen", "qwerky_tiny_ppl"],
                          task_manager=TaskManager(include_path=str(tasks)), limit=None, log_samples=True)
    res = out["results"]
    assert 0.0 <= res["qwerky_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["qwerky_tiny_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(res["qwerky_tiny_ppl"]["word_perplexity,none"])
    # the MC scores lm-eval saw equal straightforward full forwards
    for sample in out["samples"]["qwerky_tiny_mc"]:
        for (ctx, cont), resp in zip((r for r in sample["arguments"]), sample["resps"]):
            ctx_ids, cont_ids = lm._encode_pair(ctx[0] if isinstance(ctx, tuple) else ctx, cont)
            assert math.isclose(resp[0][0], _ref_loglik(student, ctx_ids, cont_ids), rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("which", [1, 2])
def test_loglikelihood_batching_does_not_change_scores(tiny_models, tokenizer, which):
    model = tiny_models[which]  # student and window baseline (both carry a state)
    reqs = [Instance("loglikelihood", {}, (q["question"], c), 0) for q in QUESTIONS for c in q["choices"]]
    reqs.append(Instance("loglikelihood", {}, ("", " The quick brown fox"), 0))
    one = QwerkyLM(model, tokenizer=tokenizer, batch_size=1, segment_len=4).loglikelihood(reqs, disable_tqdm=True)
    many = QwerkyLM(model, tokenizer=tokenizer, batch_size=5, segment_len=4).loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(one, many):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) and ga == gb


def test_loglikelihood_rolling_carries_state(tiny_models, tokenizer):
    _, student, _ = tiny_models
    text = "The quick brown fox jumps over the lazy dog. A recurrent model keeps a fixed-size state. " * 5
    lm = QwerkyLM(student, tokenizer=tokenizer, segment_len=16)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 3 * 16  # several segments
    with torch.no_grad():
        lp = student(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    ref = float(lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert math.isclose(got, ref, rel_tol=1e-4)


def test_teacher_rolling_uses_windows(tiny_models, tokenizer):
    teacher, _, _ = tiny_models
    text = "The quick brown fox jumps over the lazy dog. " * 4
    lm = QwerkyLM(teacher, tokenizer=tokenizer, max_length=2048)
    (full,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + tokenizer.encode(text, add_special_tokens=False)
    assert math.isclose(full, _ref_loglik(teacher, ids[:1], ids[1:]), rel_tol=1e-4)


def _greedy_ref(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
    return out


@pytest.mark.parametrize("which", [0, 1])
def test_generate_until_greedy_and_stops(tiny_models, tokenizer, which):
    model = tiny_models[which]  # teacher (KV cache) and student (state)
    prompts = ["What is the pass key? The pass key is", "def add(a, b):"]
    lm = QwerkyLM(model, tokenizer=tokenizer, segment_len=4)
    free = lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 6}), 0)
                              for p in prompts], disable_tqdm=True)
    for p, text in zip(prompts, free):
        ref = _greedy_ref(model, tokenizer.encode(p, add_special_tokens=False), 6)
        eos = [i for i, t in enumerate(ref) if t == tokenizer.eos_token_id]
        ref = ref[:eos[0]] if eos else ref
        assert text == tokenizer.decode(ref, skip_special_tokens=True)
    # a stop string taken from inside the free generation cuts it there
    text = free[0]
    if len(text.strip()) >= 2:
        stop = text.strip()[-1]
        (cut,) = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 6}),
                                             0)], disable_tqdm=True)
        assert cut == text.split(stop)[0]
