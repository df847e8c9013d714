"""`qwerky eval` end to end, `qwerky compare` ratio tables and `qwerky report` HTML pages."""

from __future__ import annotations

import argparse
import json

from qwerky.eval.cli import (
    add_compare_arguments,
    add_eval_arguments,
    add_report_arguments,
    compare_main,
    eval_main,
    report_main,
)
from qwerky.eval.compare import compare_results, format_markdown, load_results
from qwerky.eval.report import build_report

TEXT = ("The quick brown fox jumps over the lazy dog. A recurrent model keeps a fixed-size state. "
        "Attention looks back at every token; the state summarises them. ")


def test_eval_cli_end_to_end(teacher_dir, student_dir, tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT * (i + 1)}) + "\n" for i in range(3)))
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [str(student_dir), "--teacher", str(teacher_dir), "--data", str(data), "--seq-len", "32",
         "--max-windows", "4", "--position-max", "200", "--segment", "64", "--json", str(out), "--plot", str(plot),
         "--device", "cpu"])
    assert eval_main(args) == 0
    res = json.loads(out.read_text())
    q = res["quality"]
    assert set(q) >= {"teacher", "student", "baseline"} and q["windows"] == 4 and q["seq_len"] == 32
    assert q["baseline"]["kl"] < q["student"]["kl"] + 1e-6 or q["baseline"]["kl"] < 1e-3
    pos = res["position"]
    assert set(pos["models"]) == {"teacher", "student", "baseline"}
    assert pos["buckets"][0] == [1, 64] and pos["models"]["student"]["tokens"][0] > 0
    ctx = res["teacher_context"]  # where the teacher's own loss by position stops improving: 3 documents
    assert ctx["status"] == "not_enough_data" and ctx["effective"] is None and ctx["degrades"] is False
    assert "not enough long text to tell" in ctx["message"]
    assert pos["models"]["student"]["thin"][0] and pos["models"]["student"]["loss"][0] is None
    assert plot.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "KL(t||m)" in printed and "baseline" in printed
    assert f"n/a ({pos['models']['student']['tokens'][0]})" in printed and "not enough long text" in printed


def test_eval_cli_reports_bad_data(teacher_dir, student_dir, tmp_path, capsys):
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        [str(student_dir), "--teacher", str(teacher_dir), "--data", str(tmp_path / "missing.jsonl"),
         "--json", str(tmp_path / "x.json"), "--device", "cpu", "--no-baseline"])
    assert eval_main(args) == 2
    assert "qwerky eval: error" in capsys.readouterr().err


def _lm_eval_json(path, values):
    results = {task: {"alias": task, **{f"{m},none": v for m, v in metrics.items()},
                      **{f"{m}_stderr,none": 0.01 for m in metrics}} for task, metrics in values.items()}
    path.write_text(json.dumps({"results": results, "config": {}}))
    return path


def test_compare_ratio_table(tmp_path, capsys):
    t = _lm_eval_json(tmp_path / "t.json", {"arc_easy": {"acc": 0.8, "acc_norm": 0.75},
                                            "lambada_openai": {"acc": 0.7, "perplexity": 4.0}, "piqa": {"acc": 0.8}})
    s = _lm_eval_json(tmp_path / "s.json", {"arc_easy": {"acc": 0.72, "acc_norm": 0.75},
                                            "lambada_openai": {"acc": 0.63, "perplexity": 5.0}})
    rows = compare_results(load_results(t), load_results(s))
    assert {(r["task"], r["metric"]) for r in rows} == {("arc_easy", "acc"), ("arc_easy", "acc_norm"),
                                                        ("lambada_openai", "acc"), ("lambada_openai", "perplexity")}
    md = format_markdown(rows)
    assert "| arc_easy | acc | 80.0 | 72.0 | 0.900 |" in md
    assert "perplexity (lower is better)" in md and "| **mean** |" in md
    args = add_compare_arguments(argparse.ArgumentParser()).parse_args([str(t), str(s), "--md", str(tmp_path / "c.md"),
                                                                        "--metrics", "acc"])
    assert compare_main(args) == 0
    assert "acc_norm" not in (tmp_path / "c.md").read_text()
    assert "| piqa" not in capsys.readouterr().out


def test_report_full_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "longctx").mkdir(parents=True)
    lines = [{"stage": st, "step": i, "tokens": 8192 * i, "loss": 3.0 / (i + 1), "lr": 1e-3, "time": i * 0.5}
             for st in (1, 2) for i in range(1, 6)]
    (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    quality = {"teacher": {"ppl": 10.0, "loss": 2.3},
               "student": {"ppl": 11.0, "kl": 0.2, "top1": 0.7, "ppl_ratio": 1.1},
               "baseline": {"ppl": 10.1, "kl": 0.01, "top1": 0.93, "ppl_ratio": 1.01}}
    (run / "report.json").write_text(json.dumps({"quality": quality, "stages": [{"stage": 1, "tokens": 40960}]}))
    lc = {"task": "passkey", "lengths": [128, 256], "depths": [0.0, 1.0], "threshold": 85.6, "models": {
        name: {"acc": [[100, 50], [100, 0]], "by_length": [100.0, 25.0], "effective_length": 128}
        for name in ("teacher", "student", "baseline")}}
    (run / "longctx" / "passkey.json").write_text(json.dumps(lc))
    from qwerky.eval.plots import plot_heatmap

    plot_heatmap([[100, 50], [100, 0]], [0.0, 1.0], [128, 256], "x", run / "longctx" / "passkey_student.png")
    path = build_report(run)
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 2  # training curves + heatmap
    assert "1 line(s) of log.jsonl were not JSON" in page
    assert "KL(teacher||model)" in page and "70.0%" in page and "passkey_student.png" in page
    assert "eff.len" in page and "missing:" not in page
    assert "src=\"http" not in page and "<link" not in page  # self-contained


def test_report_missing_parts(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    args = add_report_arguments(argparse.ArgumentParser()).parse_args([str(run)])
    assert report_main(args) == 0
    page = (run / "report.html").read_text()
    assert "missing: log.jsonl" in page and "missing: report.json" in page and "missing: longctx/" in page
    (run / "report.json").write_text("{broken")
    assert "not valid JSON" in build_report(run).read_text()
    assert report_main(add_report_arguments(argparse.ArgumentParser()).parse_args([str(tmp_path / "nope")])) == 2
