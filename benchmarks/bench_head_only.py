"""Head-only adaptation (adapt="head", ANIL-style) against full adaptation (adapt="all") for
iMAML-GD and iMAML-HF: time per meta-gradient, and test accuracy after a short meta-training on
real Omniglot.

    IMAML_DATA=/work/shared/data python benchmarks/bench_head_only.py            # about 10 min
    IMAML_DATA=/work/shared/data python benchmarks/bench_head_only.py --quick    # ~1 min sanity run
    python benchmarks/bench_head_only.py --meta-batch 32 --no-train               # timing only

1. Correctness first (float64, 2 tasks of 5-way 1-shot on the Omniglot conv net): the head-only
   meta-gradient of every parameter against autograd through unrolled inner GD
   (imaml_ext.head_only.unrolled_meta_gradient), for iMAML-GD and iMAML-HF; and the compiled
   kernels against their PyTorch twins on the timed float32 configuration.
2. Speed: the paper's 4-block, 64-filter Omniglot net, random images (cost does not depend on
   pixel values), the paper's settings (lam 2, 16 / 25 GD steps of lr 0.1, HF 4 Newton-CG
   iterations of 5 CG steps, 5 CG steps for the meta-gradient, the paper's matrix (I + H/lam)).
   Per setting, one warm-up call each, then --rounds rounds, each running the four contenders
   once in a rotated order (a shared machine's speed drifts within minutes); the speed-up of
   head-only is the median over rounds of the per-round ratio all / head. Default meta-batch:
   32 for 5-way 1-shot; 4 for 20-way 5-shot on the CPU, where one full-adaptation iMAML-HF
   meta-gradient takes about 15 s per task on the shared 2-core machine (18 s a task at
   meta-batch 8, load average 6: 32 tasks would take 10 minutes a call); --meta-batch N sets
   every setting, --settings 5w1s:32,20w5s:32 the paper's meta-batch everywhere.
3. Accuracy: each variant meta-trained for --train-steps meta-steps on Omniglot 5-way 1-shot
   (background characters less 100, Adam 1e-3, seed 0, the same task stream for all) through
   imaml_ext.train.Trainer, then evaluated on the same --eval-tasks tasks of the evaluation
   characters (mean accuracy, 95% CI 1.96 std / sqrt(n), and the paired difference head - all on
   those tasks). With --equal-time, each head-only run then continues (resumed from its
   checkpoint) until its training time equals the full-adaptation run's, and is evaluated again.

Writes benchmarks/results/head_only_cpu.{json,md} (or --out) with the machine description, and
prints the tables.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (RESULTS, environment, machine_line, pick_device, time_once,  # noqa: E402
                    write_json)

from imaml_ext import train as tr  # noqa: E402
from imaml_ext.algorithms import IMAMLGD, make_algorithm  # noqa: E402
from imaml_ext.config import HF_NEWTON_STEPS, TrainConfig, paper_defaults  # noqa: E402
from imaml_ext.evaluate import confidence_interval  # noqa: E402
from imaml_ext.head_only import head_gd, unrolled_meta_gradient  # noqa: E402
from imaml_ext.models import make_model  # noqa: E402
from imaml_ext.types import TaskBatch  # noqa: E402

ALGOS = ("imaml-gd", "imaml-hf")
ADAPTS = ("head", "all")
LABEL = {("imaml-gd", "head"): "iMAML-GD, head only", ("imaml-gd", "all"): "iMAML-GD, all",
         ("imaml-hf", "head"): "iMAML-HF, head only", ("imaml-hf", "all"): "iMAML-HF, all"}


class FixedStepHeadGD(IMAMLGD):
    """iMAML-GD, head only, with the fixed step inner_lr (head_gd's safeguard off): the row that
    shows why the safeguard is there."""

    def _head_inner(self, F, y, W0, b0):
        c = self.config
        return head_gd(F, y, W0, b0, lam=c.lam, steps=c.inner_steps, lr=c.inner_lr,
                       proximal=c.proximal, safeguard=False)


def random_tasks(ways: int, shots: int, queries: int, M: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).expand(M, -1).contiguous()

    return TaskBatch(torch.rand(M, ways * shots, 1, 28, 28, generator=g), labels(shots),
                     torch.rand(M, ways * queries, 1, 28, 28, generator=g), labels(queries))


def algorithm(name: str, adapt: str, ways: int, **kw):
    d = paper_defaults("omniglot", ways)
    steps = d["inner_steps"] if name == "imaml-gd" else HF_NEWTON_STEPS
    return make_algorithm(name, adapt=adapt, lam=d["lam"], inner_steps=steps,
                          inner_lr=d["inner_lr"], cg_steps=d["cg_steps"], **kw)


def rel(a: dict, b: dict) -> float:
    fa = torch.cat([v.reshape(-1) for v in a.values()])
    fb = torch.cat([b[k].reshape(-1) for k in a])
    return float((fa - fb).norm() / fb.norm())


# ---- 1. correctness -------------------------------------------------------------------------

def correctness(queries: int) -> dict:
    torch.manual_seed(0)
    model = make_model("omniglot", 5).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    t = random_tasks(5, 1, queries, 2, seed=1).to(dtype=torch.float64)
    lam = 2.0
    truth = unrolled_meta_gradient(model, params, t, lam=lam)
    out = {"tasks": 2, "dtype": "float64",
           "oracle": "autograd through unrolled GD on the head, contracted to 1e-15"}
    # GD to convergence: a step size below 1 / (lam + ||H||) (see unrolled_meta_gradient)
    with torch.no_grad():
        fs = torch.stack([model.features(x) for x in t.x_support])
    lr = 1.0 / (lam + 0.5 * float((fs ** 2).sum(-1).max()) + 0.5)
    gd_steps = math.ceil(math.log(1e-15) / math.log1p(-lr * lam))
    exact = {"imaml-gd": dict(inner_steps=gd_steps, inner_lr=lr), "imaml-hf": dict(inner_steps=10)}
    for name in ALGOS:
        a = make_algorithm(name, adapt="head", lam=lam, cg_steps=60, cg_rtol=1e-14,
                           hf_cg_steps=30, **exact[name])
        g, _ = a.meta_gradient(model, params, t)
        out[f"{name}_rel_err"] = rel(g, truth)
    # compiled kernels against their twins, float32, the timed settings
    m32 = make_model("omniglot", 5)
    p32 = {k: v.detach().clone() for k, v in m32.named_parameters()}
    t32 = random_tasks(5, 1, queries, 4, seed=2)
    for name in ALGOS:
        ge, _ = algorithm(name, "head", 5, use_ext=True).meta_gradient(m32, p32, t32)
        gr, _ = algorithm(name, "head", 5, use_ext=False).meta_gradient(m32, p32, t32)
        out[f"{name}_ext_vs_reference_f32"] = rel(ge, gr)
    out["passed"] = all(out[f"{n}_rel_err"] < 1e-8 and out[f"{n}_ext_vs_reference_f32"] < 1e-4
                        for n in ALGOS)
    return out


# ---- 2. speed -------------------------------------------------------------------------------

def time_setting(ways: int, shots: int, M: int, queries: int, rounds: int,
                 device: torch.device = torch.device("cpu")) -> dict:
    torch.manual_seed(0)
    model = make_model("omniglot", ways).to(device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tasks = random_tasks(ways, shots, queries, M).to(device=device)
    keys = [(a, d) for a in ALGOS for d in ADAPTS]
    algos = {k: algorithm(k[0], k[1], ways) for k in keys}
    times = {k: [] for k in keys}
    info = {}
    for k in keys:  # warm-up on the timed shapes (the first call per shape builds kernels), with
        # one inner step (a full adaptation's cost is linear in them); warmed on one task, full
        # adaptation's first timed round carried that cost into its median and the speed-up
        algos[k].with_options(inner_steps=1).meta_gradient(model, params, tasks)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            res = {}
            times[k].append(time_once(lambda: res.update(
                m=algos[k].meta_gradient(model, params, tasks)[1]), device))
            m = res["m"]
            info[k] = {"cg_iterations_mean": float(m["cg_iterations"].float().mean()),
                       "cg_status_counts": torch.bincount(m["cg_status"].clamp(min=0),
                                                          minlength=4).tolist(),
                       "num_ok": int(m["num_ok"])}
            print(f"  {ways}w{shots}s M={M} round {r + 1}: {LABEL[k]:22s} {times[k][-1]:8.3f} s",
                  flush=True)
    out = {"setting": f"{ways}w{shots}s", "ways": ways, "shots": shots, "queries": queries,
           "meta_batch": M, "rounds": rounds, "device": str(device), "results": {}}
    for k in keys:
        med = statistics.median(times[k])
        out["results"][f"{k[0]}/{k[1]}"] = {"label": LABEL[k], "median_s": med,
                                            "times_s": times[k], "tasks_per_s": M / med,
                                            **info[k]}
    for a in ALGOS:
        ratios = [x / y for x, y in zip(times[(a, "all")], times[(a, "head")])]
        out[f"speedup_{a}"] = {"median": statistics.median(ratios), "per_round": ratios}
    return out


# ---- 3. accuracy ----------------------------------------------------------------------------

def per_task_accuracy(algo, model, params, sampler, n: int) -> torch.Tensor:
    accs = []
    for batch in sampler.iter_batches(0, -(-n // sampler.meta_batch)):
        accs.append(algo.evaluate(model, params, batch)[1].double())
    return torch.cat(accs)[:n]


def train_and_eval(args, runs: Path) -> dict:
    base = dict(dataset="omniglot", ways=5, shots=1, queries=args.train_queries, device=args.device,
                meta_batch=args.train_meta_batch, steps=args.train_steps, val_every=0,
                ckpt_every=0, log_every=max(args.train_steps, 1), quiet=True, seed=0,
                data_root=args.data_root)
    test_cfg = tr.resolve(TrainConfig(**base))
    test_data = tr.load_split(test_cfg, "test")
    rows, accs = [], {}

    def evaluate(trainer) -> torch.Tensor:
        sampler = tr.make_sampler(trainer.cfg, test_data, args.eval_meta_batch, seed=12345,
                                  num_workers=0, per_task_seed=True)
        t0 = time.perf_counter()
        a = per_task_accuracy(trainer.algorithm, trainer.model, trainer.params, sampler,
                              args.eval_tasks)
        sampler.close()
        return a, time.perf_counter() - t0

    def row(key, trainer, summary, train_s, a, eval_s, note=""):
        mean, ci = confidence_interval(a.numpy())
        r = {"algo": key[0], "adapt": key[1], "variant": note or "default",
             "label": LABEL[key] + note,
             "meta_steps": trainer.step, "train_seconds": train_s, "eval_seconds": eval_s,
             "accuracy": mean, "ci95": ci, "eval_tasks": int(a.numel()),
             "skipped_tasks": summary["skipped_tasks"], "bad_steps": summary["bad_steps"]}
        print(f"  {r['label']:40s} {r['meta_steps']:5d} steps {train_s:7.1f} s  "
              f"{100 * mean:6.2f}% +- {100 * ci:.2f}%", flush=True)
        return r

    train_time = {}
    for a in ALGOS:
        for d in ("all", "head"):
            cfg = TrainConfig(**base, algo=a, adapt=d, out=str(runs / f"{a}-{d}"))
            trainer = tr.Trainer(cfg)
            t0 = time.perf_counter()
            summary = trainer.run()
            train_s = time.perf_counter() - t0
            train_time[(a, d)] = train_s
            acc, eval_s = evaluate(trainer)
            accs[(a, d)] = acc
            rows.append(row((a, d), trainer, summary, train_s, acc, eval_s))
        if a == "imaml-gd":  # the same run without head_gd's step-size safeguard
            cfg = TrainConfig(**base, algo=a, adapt="head", out=str(runs / f"{a}-head-fixed"))
            fixed = FixedStepHeadGD(tr.build_algorithm(tr.resolve(cfg)).config)
            trainer = tr.Trainer(cfg, algorithm=fixed)
            t0 = time.perf_counter()
            summary = trainer.run()
            train_s = time.perf_counter() - t0
            acc, eval_s = evaluate(trainer)
            accs[(a, "head-fixed-step")] = acc
            rows.append(row((a, "head"), trainer, summary, train_s, acc, eval_s,
                            f", fixed step {trainer.cfg.inner_lr:g} (no safeguard)"))
        if args.equal_time:
            budget = train_time[(a, "all")] - train_time[(a, "head")]
            cfg = TrainConfig(**base, algo=a, adapt="head", out=str(runs / f"{a}-head"))
            cfg = cfg.replace(steps=10 ** 6, max_time=max(budget, 1e-3))
            trainer = tr.Trainer(cfg, resume=str(runs / f"{a}-head"))
            t0 = time.perf_counter()
            summary = trainer.run()
            train_s = train_time[(a, "head")] + time.perf_counter() - t0
            acc, eval_s = evaluate(trainer)
            accs[(a, "head-equal-time")] = acc
            rows.append(row((a, "head"), trainer, summary, train_s, acc, eval_s,
                            ", same time as all"))
    paired = {}
    for a in ALGOS:
        for hk in ("head", "head-fixed-step", "head-equal-time"):
            if (a, hk) in accs:
                diff = (accs[(a, hk)] - accs[(a, "all")]).numpy()
                m, ci = confidence_interval(diff)
                paired[f"{a}/{hk}-minus-all"] = {"mean": m, "ci95": ci}
    return {"setting": "omniglot 5w1s", "queries": args.train_queries,
            "meta_batch": args.train_meta_batch, "meta_steps": args.train_steps,
            "eval_tasks": args.eval_tasks, "data": test_data.source, "rows": rows,
            "paired_difference": paired}


# ---- output ---------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    env = report["environment"]
    dev = str(report["args"].get("device", "cpu"))
    where = "CPU" if dev == "cpu" else dev
    lines = [f"# Head-only adaptation against full adaptation (iMAML-GD, iMAML-HF), {where}", "",
             f"Machine: {machine_line(env)}; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in env.get('load_average', []))}. Commit {env.get('git_commit')}, {env['date']}; the whole run took "
             f"{report['total_seconds']:.0f} s.", "",
             f"Produced by: `{report['command']}`", ""]
    c = report["correctness"]
    lines += [f"Correctness (float64, 2 tasks, Omniglot net; oracle: {c['oracle']}): relative "
              f"error iMAML-GD {c['imaml-gd_rel_err']:.1e}, iMAML-HF {c['imaml-hf_rel_err']:.1e}; "
              f"compiled kernels against the PyTorch twins (float32) "
              f"{c['imaml-gd_ext_vs_reference_f32']:.1e} / {c['imaml-hf_ext_vs_reference_f32']:.1e}"
              f": {'passed' if c['passed'] else 'FAILED'}.", "",
              "## Time per meta-gradient (median over rounds; speed-up = median of per-round "
              "ratios all / head)", "",
              "| setting | meta-batch | algorithm | adapt=all | adapt=head | speed-up |",
              "|---|---|---|---|---|---|"]
    for s in report["speed"]:
        for a in ALGOS:
            ra, rh = s["results"][f"{a}/all"], s["results"][f"{a}/head"]
            lines.append(f"| {s['ways']}-way {s['shots']}-shot ({s['queries']} queries) | "
                         f"{s['meta_batch']} | {a} | {ra['median_s']:.3f} s | "
                         f"{rh['median_s']:.3f} s | {s[f'speedup_{a}']['median']:.1f}x |")
    if report.get("accuracy"):
        acc = report["accuracy"]
        lines += ["", f"## Test accuracy after a short meta-training (Omniglot 5-way 1-shot, "
                  f"{acc['meta_steps']} meta-steps of {acc['meta_batch']} tasks, "
                  f"{acc['queries']} queries per class; {acc['eval_tasks']} test tasks of the "
                  f"evaluation characters, the same for every row)", "",
                  "| variant | meta-steps | train time | test accuracy (95% CI) |",
                  "|---|---|---|---|"]
        for r in acc["rows"]:
            lines.append(f"| {r['label']} | {r['meta_steps']} | {r['train_seconds']:.0f} s | "
                         f"{100 * r['accuracy']:.2f}% +- {100 * r['ci95']:.2f}% |")
        lines += ["", "Paired difference on the same test tasks (head - all, percentage points, "
                  "95% CI):", ""]
        for k, v in acc["paired_difference"].items():
            lines.append(f"- {k}: {100 * v['mean']:+.2f} +- {100 * v['ci95']:.2f}")
        lines += ["", "A reduced budget: the start of meta-training, not accuracies at "
                  "convergence (the paper trains for many thousands of meta-steps of 32 tasks). "
                  "The fixed-step row is head-only iMAML-GD with the inner step fixed at inner_lr "
                  "(imaml_ext.head_only.head_gd's step-size safeguard off): meta-training grows "
                  "the body's features until that step overshoots (see head_gd)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a sanity run (~1-2 min)")
    p.add_argument("--settings", default="5w1s:32,20w5s:4",
                   help="comma-separated WAYSwSHOTSs[:META_BATCH] (default 5w1s:32,20w5s:4)")
    p.add_argument("--meta-batch", type=int, default=None, help="meta-batch of every setting")
    p.add_argument("--queries", type=int, default=5, help="query images per class (timing)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; on a machine shared with other jobs "
                   "1 gives steadier numbers)")
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--train-meta-batch", type=int, default=4)
    p.add_argument("--train-queries", type=int, default=5)
    p.add_argument("--eval-tasks", type=int, default=100)
    p.add_argument("--eval-meta-batch", type=int, default=25)
    p.add_argument("--no-equal-time", dest="equal_time", action="store_false")
    p.add_argument("--data-root", default=None, help="default $IMAML_DATA")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or auto: timing and meta-training (the correctness check runs "
                   "on the CPU in float64)")
    p.add_argument("--out", default=None, help="default benchmarks/results/head_only_<device>")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    args.device = str(device)
    if args.out is None:
        args.out = str(RESULTS / f"head_only_{device.type}")
    if args.quick:
        args.settings, args.rounds = "5w1s:2", 1
        args.train_steps, args.train_meta_batch, args.eval_tasks = 2, 2, 10
        args.equal_time = False
        if args.out == str(RESULTS / f"head_only_{device.type}"):
            args.out = str(Path(tempfile.gettempdir()) / "head_only_quick")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = []
    for s in args.settings.split(","):
        spec, _, mb = s.partition(":")
        ways, shots = spec.rstrip("s").split("w")
        settings.append((int(ways), int(shots), args.meta_batch or int(mb or 32)))
    t_start = time.perf_counter()
    print(f"bench_head_only on {machine_line(environment(device))}", flush=True)
    corr = correctness(args.queries)
    print(f"correctness: {corr}", flush=True)
    if not corr["passed"]:
        print("correctness check FAILED: not timing", file=sys.stderr)
        return 1
    speed = [time_setting(w, s, m, args.queries, args.rounds, device) for w, s, m in settings]
    accuracy = None
    if args.train:
        with tempfile.TemporaryDirectory(prefix="head_only_runs_") as runs:
            accuracy = train_and_eval(args, Path(runs))
    cmd = "python benchmarks/bench_head_only.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    report = {"benchmark": "head_only", "quick": args.quick, "args": vars(args),
              "command": ("IMAML_DATA=/work/shared/data " if args.train and not args.data_root
                          else "") + cmd.strip(),
              "correctness": corr, "speed": speed, "accuracy": accuracy,
              "total_seconds": time.perf_counter() - t_start, "environment": environment(device)}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} "
          f"({report['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
