"""Reduced-budget results table: every algorithm meta-trained with the same budget through the
``imaml`` CLI, then evaluated with its 95% confidence interval.

    python benchmarks/omniglot_table.py                       # Omniglot 5-way 1-shot, 5 algorithms
    python benchmarks/omniglot_table.py --dataset miniimagenet --algos imaml-gd --steps 40 \\
        --eval-tasks 100 --out benchmarks/results/miniimagenet_standin_cpu

Runs the algorithms one after the other (each a ``imaml train`` then an ``imaml eval``
subprocess; the exact commands go into the outputs) and rewrites ``<out>.json`` and ``<out>.md``
after each, so an interrupted table keeps what finished. A run whose final checkpoint exists is
not trained again; a partial one is resumed (``--resume``).

The budget (meta-steps, meta-batch, queries, inner steps) is far below the paper's: the figures
are a reduced-budget comparison on one CPU, not a reproduction of the paper's tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
LABEL = {"imaml-gd": "iMAML, GD", "imaml-hf": "iMAML, Hessian-free", "maml": "MAML",
         "fomaml": "first-order MAML", "reptile": "Reptile"}
PAPER_5W1S = {"imaml-gd": 99.16, "imaml-hf": 99.50, "maml": 98.7, "fomaml": 98.3,
              "reptile": 97.68}
PAPER_MINI = {"imaml-gd": 48.96, "imaml-hf": 49.30, "maml": 48.70, "fomaml": 48.07,
              "reptile": 49.97}


def make_title(ways: int, shots: int, mini: bool) -> str:
    if mini:
        return (f"Mini-ImageNet stand-in (tiny-mini-imagenet) {ways}-way {shots}-shot, reduced "
                f"budget on CPU: NOT comparable with published figures")
    return f"Omniglot {ways}-way {shots}-shot, REDUCED BUDGET on CPU"


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "a") as f:
        f.write(f"$ {shell(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="omniglot")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=None, help="default: the paper's")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--extra", default="", help="more `imaml train` options, one string, given to every "
                   "algorithm (the implicit-gradient options --lam / --hvp / --cg-* are refused by "
                   "the baselines)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "table"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "omniglot_5w1s_cpu"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--render-only", action="store_true",
                   help="rewrite <out>.md from <out>.json and stop")
    args = p.parse_args(argv)
    mini = args.dataset.replace("-", "") == "miniimagenet"
    if args.render_only:
        report = json.loads(Path(args.out).with_suffix(".json").read_text())
        report["title"] = make_title(args.ways, args.shots, mini)
        write(Path(args.out), report, mini)
        return 0

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if args.data_root:
        env["IMAML_DATA"] = args.data_root
    tag = f"{args.dataset}_{args.ways}w{args.shots}s"
    runs = Path(args.runs_dir) / tag
    runs.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "imaml_ext.cli"]
    budget = {"meta_steps": args.steps, "meta_batch": args.meta_batch, "queries": args.queries,
              "inner_steps": args.inner_steps or "paper default", "eval_tasks": args.eval_tasks,
              "extra": args.extra}
    report = {
        "title": make_title(args.ways, args.shots, mini),
        "budget": budget, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                      "torch": torch.__version__,
                                      "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS")},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [],
        "runner_command": "python benchmarks/omniglot_table.py " + shell(sys.argv[1:] if argv is None
                                                                        else argv)}

    for algo in args.algos:
        run = runs.resolve() / algo
        run.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(run, ROOT)  # the commands run from ROOT
        log = run / "table.log"
        train = py + ["train", "--dataset", args.dataset, "--ways", str(args.ways), "--shots",
                      str(args.shots), "--algo", algo, "--steps", str(args.steps),
                      "--meta-batch", str(args.meta_batch), "--queries", str(args.queries),
                      "--val-every", "0", "--ckpt-every", str(max(args.steps // 5, 1)),
                      "--log-every", "10", "--out", rel]
        if args.inner_steps:
            train += ["--inner-steps", str(args.inner_steps)]
        train += shlex.split(args.extra)
        final = run / "checkpoints" / f"ckpt_{args.steps:08d}.pt"
        t0 = time.perf_counter()
        rc = 0
        if not final.exists():
            cmd = train + (["--resume", rel] if (run / "checkpoints").is_dir() else [])
            rc = run_logged(cmd, log, env)
        t_train = time.perf_counter() - t0
        row = {"algo": algo, "label": LABEL[algo], "train_command": "imaml " + shell(train[3:]),
               "train_seconds": round(t_train, 1), "train_rc": rc}
        if rc == 0:
            ev_json = run / "eval.json"
            ev = py + ["eval", "--checkpoint", rel, "--tasks", str(args.eval_tasks),
                       "--meta-batch", "25", "--json", os.path.join(rel, "eval.json")]
            t1 = time.perf_counter()
            erc = run_logged(ev, log, env)
            row.update(eval_command="imaml " + shell(ev[3:]), eval_rc=erc,
                       eval_seconds=round(time.perf_counter() - t1, 1))
            if erc == 0:
                res = json.loads(ev_json.read_text())
                row.update(accuracy=res["result"]["accuracy"], ci95=res["result"]["ci95"],
                           eval_tasks=res["result"]["num_tasks"], meta_steps=res["step"],
                           data=res.get("data_source"))
        report["rows"].append(row)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write(out, report, mini)
        print(json.dumps(row), flush=True)
    return 0


def write(out: Path, report: dict, mini: bool) -> None:
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    b = report["budget"]
    paper = PAPER_MINI if mini else PAPER_5W1S
    lines = [f"# {report['title']}", ""]
    if mini:
        lines += ["**Not comparable with published Mini-ImageNet figures**: the data is the "
                  "`tiny-mini-imagenet` stand-in (100 Tiny-ImageNet classes, 64x64 photos "
                  "upsampled to 84x84, 100 per class). This run only shows the pipeline working "
                  "end to end.", ""]
    lines += [f"**Reduced budget**: {b['meta_steps']} meta-steps of {b['meta_batch']} tasks "
              f"({b['queries']} query images per class, inner steps: {b['inner_steps']}"
              f"{', ' + b['extra'] if b['extra'] else ''}), the same for every algorithm; the "
              f"paper trains for many thousands of meta-steps of 32 tasks. Evaluation: "
              f"{b['eval_tasks']} test tasks, mean accuracy +- 1.96 std / sqrt(n).", "",
              f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs "
              f"(shared with other jobs while this ran), torch {report['machine']['torch']}, "
              f"OMP_NUM_THREADS={report['machine']['OMP_NUM_THREADS']}. Started "
              f"{report['started']}, last row {report.get('finished', '')}.", "",
              "| algorithm | test accuracy (95% CI) | meta-steps | train time | eval time | "
              f"paper ({'Mini-ImageNet' if mini else 'full budget'}) |",
              "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        acc = (f"{100 * r['accuracy']:.2f}% +- {100 * r['ci95']:.2f}%" if "accuracy" in r
               else f"failed (train rc {r['train_rc']}, eval rc {r.get('eval_rc')})")
        lines.append(f"| {r['label']} | {acc} | {r.get('meta_steps', '')} | "
                     f"{r['train_seconds']:.0f} s | {r.get('eval_seconds', 0):.0f} s | "
                     f"{paper[r['algo']]}% |")
    for note in report.get("notes", []):
        lines += ["", note]
    if report.get("runner_command"):
        lines += ["", f"Produced by: `{report['runner_command']}`"]
    lines += ["", "Exact commands (from the repository root; `imaml` is `python -m imaml_ext.cli`; "
              "IMAML_DATA points at the data):", "", "```"]
    for r in report["rows"]:
        lines.append(r["train_command"])
        if "eval_command" in r:
            lines.append(r["eval_command"])
    lines += ["```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
