"""Run configuration: the paper's settings per (data set, ways, algorithm), all overridable.

The defaults follow Rajeswaran et al. 2019 (iMAML), Section 5 and Appendix:

| setting | Omniglot 5-way | Omniglot 20-way | Mini-ImageNet |
|---|---|---|---|
| lam (proximal strength) | 2.0 | 2.0 | 0.5 |
| inner GD steps (iMAML-GD, MAML, FOMAML, Reptile) | 16 | 25 | 10 |
| inner lr | 0.1 | 0.1 | 0.1 |
| CG steps for the meta-gradient | 5 | 5 | 5 |
| meta-batch (tasks per meta-step) | 32 | 32 | 32 |
| meta-optimizer | Adam, lr 1e-3 | Adam, lr 1e-3 | Adam, lr 1e-3 |

Choices the paper leaves open, made here (each a flag):
- Omniglot's split (``protocol``): the paper's, 1,200 training characters of 1,623 drawn with
  the run's seed and the other 423 for testing (MAML's protocol, on which Table 2's figures were
  measured; drawn with ONE seed, so that no test character is trained on); ``--protocol
  background`` trains on the background set (964 characters) and tests on the evaluation set's
  unseen alphabets (659), the harder split of Lake et al. Runs before 2026-11-29 defaulted to
  ``background`` (their checkpoints record it, and resume and ``imaml eval`` keep it).
- ``queries`` (query images per class): 15, the common N-way K-shot protocol (Omniglot has 20
  drawings per character, so 5-shot + 15 queries uses all of them). The iMAML authors' code uses
  as many queries as shots; pass ``--queries 1`` (1-shot) to reproduce that.
- ``steps`` (meta-steps): 30,000. The paper trains "many thousands"; this is a budget, not a
  figure read from the paper.
- Hessian-free inner solver (iMAML-HF): ``inner_steps`` counts Newton-CG iterations there, 4
  by default (``imaml_ext.algorithms``' default; the paper gives no figure), each with 5 CG steps
  (``hf_cg_steps``) and an Armijo line search.
- Head-only adaptation (``adapt="head"``, ``--adapt head``; iMAML-GD and iMAML-HF only): the
  body keeps the meta-parameters and only the linear head is adapted per task (ANIL-style; see
  :mod:`imaml_ext.head_only`). Default ``"all"``, the paper's.
- Reptile's outer step: its direction ``theta - mean(phi)`` is fed to the meta-optimizer as if
  it were a gradient (``meta_opt="adam"``, the default, as for the other algorithms, so one meta
  lr serves all five). ``--meta-opt sgd --meta-lr 1.0`` is Nichol et al.'s original
  ``theta += eps * mean(phi - theta)`` with step size eps = the meta lr (no annealing).

Identity: the fields in :data:`IDENTITY_FIELDS` fix the model, the algorithm, the task stream and
the meta-optimizer; a checkpoint can only be resumed under a config that agrees on all of them
(the others, e.g. ``steps``, ``device`` or ``val_every``, may change on resume).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaml_ext._atomic import atomic_write

ALGORITHM_NAMES = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
DATASET_NAMES = ("omniglot", "miniimagenet")
HVP_KINDS = ("exact", "ggn", "double_backward")
PROTOCOLS = ("background", "paper")
DTYPES = ("float32", "float64")
LOG_FORMATS = ("csv", "jsonl")
META_OPTS = ("adam", "sgd")
PROXIMAL = ("paper", "authors")
ADAPT = ("all", "head")
HEAD_ALGORITHMS = ("imaml-gd", "imaml-hf")
HEAD_HVP = ("exact", "ggn")


HF_NEWTON_STEPS = 4  # iMAML-HF's default inner (Newton-CG) iterations


class UsageError(Exception):
    """A bad option or option combination; the command line prints it on one line (exit 2)."""


def canonical_dataset(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise UsageError(f"unknown data set {name!r}; expected one of {DATASET_NAMES}")
    return key


def paper_defaults(dataset: str, ways: int) -> dict[str, Any]:
    """The paper's settings for ``dataset`` and N ``ways`` (see the module table)."""
    ds = canonical_dataset(dataset)
    if ds == "miniimagenet":
        return {"lam": 0.5, "inner_steps": 10, "inner_lr": 0.1, "cg_steps": 5,
                "meta_batch": 32, "meta_lr": 1e-3, "queries": 15}
    return {"lam": 2.0, "inner_steps": 16 if ways <= 5 else 25, "inner_lr": 0.1, "cg_steps": 5,
            "meta_batch": 32, "meta_lr": 1e-3, "queries": 15}


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` fields take the paper default
    (:func:`resolve`)."""

    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int | None = None
    algo: str = "imaml-gd"
    # Algorithm
    loss: str = "cross_entropy"
    lam: float | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    cg_steps: int | None = None
    cg_damping: float = 0.0
    cg_lam: float | None = None
    hf_cg_steps: int = 5
    hvp: str = "exact"
    proximal: str = "paper"
    adapt: str = "all"
    use_ext: bool | None = None
    compile_hvp: bool = False
    cuda_graph: bool | str = False  # False, "solve" or "step" (True: "solve")
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark for the run (CUDA only)
    # Meta-optimisation
    steps: int = 30000
    meta_batch: int | None = None
    meta_lr: float | None = None
    meta_opt: str = "adam"
    max_bad_steps: int = 10
    max_time: float = 0.0  # seconds of training after which to checkpoint and stop; 0: none
    # Data / model
    protocol: str | None = None  # Omniglot: "paper" (the default) or "background"
    val_classes: int | None = None
    data_root: str | None = None
    downsample: str = "pool"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_workers: int = 0
    # Bookkeeping
    out: str | None = None
    ckpt_every: int = 500
    keep_ckpts: int = 3
    val_every: int = 1000
    val_tasks: int = 200
    log_every: int = 10
    log_format: str = "csv"
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY_FIELDS}

    def algorithm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``imaml_ext.algorithms.make_algorithm`` (after :func:`resolve`),
        less the fields the algorithm does not use (make_algorithm refuses those; a baseline's
        checkpoint written before resolve refused them may still hold one)."""
        kw = {"loss": self.loss, "lam": self.lam, "inner_steps": self.inner_steps,
              "inner_lr": self.inner_lr, "cg_steps": self.cg_steps,
              "cg_damping": self.cg_damping, "cg_lam": self.cg_lam,
              "hf_cg_steps": self.hf_cg_steps, "hvp": self.hvp, "proximal": self.proximal,
              "adapt": self.adapt, "use_ext": self.use_ext, "compile_hvp": self.compile_hvp,
              "cuda_graph": self.cuda_graph}
        for name in run_unused_fields(self.algo):
            kw.pop(name, None)
        return kw

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Writes the config dump atomically (a crash mid-write leaves the old one whole)."""
        data = {"config": self.to_dict(), **(extra or {})}
        text = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(path, lambda f: f.write(text))


# The fields that fix the model, the algorithm, the task stream and the meta-optimizer.
IDENTITY_FIELDS = ("dataset", "ways", "shots", "queries", "algo", "loss", "lam", "inner_steps",
                   "inner_lr", "cg_steps", "cg_damping", "cg_lam", "hf_cg_steps", "hvp",
                   "proximal", "adapt", "meta_batch", "meta_lr", "meta_opt", "protocol",
                   "val_classes", "downsample", "seed", "dtype")
# Fields of the implicit meta-gradient (and of iMAML-HF's inner Newton-CG): a baseline refuses
# values other than their defaults (resolve) and ignores them in a checkpoint it resumes.
IMPLICIT_FIELDS = ("hvp", "cg_steps", "cg_damping", "cg_lam", "hf_cg_steps")
# What a baseline (MAML, first-order MAML, Reptile: plain GD inner loops) does not use: those,
# and the proximal strength lam of the iMAML inner objective.
BASELINE_UNUSED = IMPLICIT_FIELDS + ("lam",)
# Identity fields added after checkpoints were first written: the value an older checkpoint,
# which lacks the field, was trained with.
IDENTITY_DEFAULTS = {"adapt": "all"}


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _positive(name: str, v, allow_zero: bool = False) -> None:
    if v is None:
        return
    # not v > 0 rather than v <= 0: NaN compares False both ways (--meta-lr nan trained and
    # checkpointed NaN parameters)
    if isinstance(v, bool) or not math.isfinite(v) or not (v >= 0 if allow_zero else v > 0):
        raise UsageError(f"--{name.replace('_', '-')} must be a finite number "
                         f"{'>= 0' if allow_zero else '> 0'}, got {v}")


def check_seed(seed) -> None:
    """UsageError unless --seed (train's, or eval's task draw) fits a torch generator."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise UsageError(f"--seed must be an int in [0, 2**64) (a torch generator seed), got "
                         f"{seed!r}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fills the ``None`` fields with the paper defaults and checks every value."""
    ds = canonical_dataset(cfg.dataset)
    if cfg.algo not in ALGORITHM_NAMES:
        raise UsageError(f"unknown algorithm {cfg.algo!r}; expected one of {ALGORITHM_NAMES}")
    _positive("ways", cfg.ways)
    if cfg.ways < 2:
        raise UsageError(f"--ways must be >= 2: a {cfg.ways}-way task has one class, whose "
                         f"cross-entropy is 0 and accuracy 100% whatever the model; got "
                         f"{cfg.ways}")
    _positive("shots", cfg.shots)
    check_seed(cfg.seed)
    d = paper_defaults(ds, cfg.ways)
    if cfg.algo == "imaml-hf":
        d["inner_steps"] = HF_NEWTON_STEPS
    out = cfg.replace(dataset=ds, **{k: v for k, v in d.items() if getattr(cfg, k) is None})
    if out.protocol is None:
        # Omniglot: the paper's 1,200 / 423 character split (MAML's protocol, which Tables 2 and
        # 3 use); Mini-ImageNet has one split, recorded as "background" (the value checkpoints
        # have always held for it)
        out = out.replace(protocol="paper" if ds == "omniglot" else "background")
    for name in ("queries", "inner_steps", "cg_steps", "meta_batch", "hf_cg_steps", "val_tasks",
                 "log_every", "keep_ckpts", "max_bad_steps"):
        _positive(name, getattr(out, name))
    for name in ("lam", "inner_lr", "meta_lr"):
        _positive(name, getattr(out, name))
    _positive("cg_lam", out.cg_lam)
    for name in ("steps", "ckpt_every", "val_every", "num_workers", "cg_damping", "val_classes",
                 "max_time"):
        _positive(name, getattr(out, name), allow_zero=True)
    for name, allowed in (("hvp", HVP_KINDS), ("protocol", PROTOCOLS), ("dtype", DTYPES),
                          ("log_format", LOG_FORMATS), ("meta_opt", META_OPTS),
                          ("proximal", PROXIMAL), ("adapt", ADAPT),
                          ("downsample", ("pool", "stride"))):
        if getattr(out, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} must be one of {allowed}, got "
                             f"{getattr(out, name)!r}")
    if out.proximal != "paper" and out.algo != "imaml-gd":
        raise UsageError(f"--proximal {out.proximal} changes where the GD inner loop applies the "
                         f"proximal term: it is for --algo imaml-gd (imaml-hf's Newton-CG "
                         f"minimises G itself; the baselines' inner loops have no proximal "
                         f"term), got --algo {out.algo}")
    if out.algo not in HEAD_ALGORITHMS:
        # options of the implicit meta-gradient (and of iMAML-HF's inner solver), which the
        # baselines would silently ignore; their defaults pass (a resumed run's saved config
        # holds them filled in)
        default = {**_FIELD_DEFAULTS, "cg_steps": d["cg_steps"], "lam": d["lam"]}
        ignored = [f"--{n.replace('_', '-')} {getattr(out, n)}" for n in BASELINE_UNUSED
                   if getattr(out, n) != default[n]]
        if ignored:
            raise UsageError(f"{', '.join(ignored)}: "
                             f"{'these options set' if len(ignored) > 1 else 'this option sets'} "
                             f"the proximal inner objective, the implicit meta-gradient or "
                             f"iMAML-HF's Newton-CG inner solver, which --algo {out.algo} does "
                             f"not use")
    elif out.algo == "imaml-hf" and out.inner_lr != d["inner_lr"]:
        raise UsageError(f"--inner-lr sets the GD inner loop's step size; --algo imaml-hf runs "
                         f"Newton-CG with a line search and takes none, got --inner-lr "
                         f"{out.inner_lr}")
    elif out.algo != "imaml-hf" and out.hf_cg_steps != _FIELD_DEFAULTS["hf_cg_steps"]:
        raise UsageError(f"--hf-cg-steps sets iMAML-HF's Newton-CG inner solver; --algo "
                         f"{out.algo} runs gradient descent, got --hf-cg-steps {out.hf_cg_steps}")
    if out.algo == "imaml-gd" and out.adapt == "all" and out.inner_lr * out.lam >= 2:
        # make_algorithm's rule: the proximal term alone scales phi - theta by 1 - inner_lr lam
        raise UsageError(f"--inner-lr {out.inner_lr} x --lam {out.lam} = "
                         f"{out.inner_lr * out.lam:g}: the GD inner loop needs inner_lr * lam "
                         f"< 2 (the proximal term scales phi - theta by 1 - inner_lr lam = "
                         f"{1 - out.inner_lr * out.lam:g} per step: it diverges or overshoots)")
    if out.adapt == "head" and out.algo not in HEAD_ALGORITHMS:
        raise UsageError(f"--adapt head is implemented for {' and '.join(HEAD_ALGORITHMS)}, not "
                         f"{out.algo}")
    if out.adapt == "head" and out.hvp not in HEAD_HVP:
        raise UsageError(f"--adapt head takes --hvp {' or '.join(HEAD_HVP)} (the head's Hessian "
                         f"comes from the fused softmax-head kernel), got {out.hvp}")
    if out.compile_hvp and (out.algo not in HEAD_ALGORITHMS or out.adapt != "all"
                            or out.hvp != "exact"):
        raise UsageError(f"--compile-hvp compiles the full network's HVP for imaml-gd / "
                         f"imaml-hf with --adapt all and --hvp exact, got --algo {out.algo} "
                         f"--adapt {out.adapt} --hvp {out.hvp}")
    if out.cuda_graph and (out.algo not in HEAD_ALGORITHMS or out.adapt != "all"
                           or out.compile_hvp or not str(out.device).startswith("cuda")):
        raise UsageError(f"--cuda-graph captures the meta-gradient work of imaml-gd / imaml-hf "
                         f"with --adapt all on a GPU, without --compile-hvp; got --algo "
                         f"{out.algo} --adapt {out.adapt} --device {out.device}"
                         f"{' --compile-hvp' if out.compile_hvp else ''}")
    if out.cudnn_benchmark and not str(out.device).startswith("cuda"):
        raise UsageError(f"--cudnn-benchmark autotunes cuDNN's convolutions: it needs --device "
                         f"cuda, got --device {out.device}")
    if ds == "miniimagenet" and out.protocol != "background":
        raise UsageError("--protocol applies to omniglot only")
    return out


def unused_fields(algo: str) -> tuple[str, ...]:
    """The identity fields that `algo` does not use: the implicit meta-gradient's for the
    baselines, the Newton-CG solver's for imaml-gd, the GD step size for imaml-hf."""
    if algo in HEAD_ALGORITHMS:
        # imaml-hf's inner solver is Newton-CG with a line search: it takes no GD step size
        return ("inner_lr",) if algo == "imaml-hf" else ("hf_cg_steps",)
    return IMPLICIT_FIELDS


def run_unused_fields(algo: str) -> tuple[str, ...]:
    """unused_fields, plus lam for the baselines: a training run (TrainConfig, the CLI) has no
    regularized baseline, whose GD inner loop alone would use lam (make_algorithm's
    regularized=True)."""
    return BASELINE_UNUSED if algo not in HEAD_ALGORITHMS else unused_fields(algo)


def identity_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``field: checkpoint X, requested Y`` for every differing identity field
    (fields the algorithm does not use excepted)."""
    diffs = []
    skip = run_unused_fields(current.get("algo", saved.get("algo")))
    for k in IDENTITY_FIELDS:
        if k in skip:
            continue
        a = saved.get(k, IDENTITY_DEFAULTS.get(k, "<absent>"))
        b = current.get(k, IDENTITY_DEFAULTS.get(k, "<absent>"))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            diffs.append(f"{k}: checkpoint {a!r}, requested {b!r}")
    return diffs


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


__all__ = ["ALGORITHM_NAMES", "DATASET_NAMES", "IDENTITY_FIELDS", "IMPLICIT_FIELDS", "TrainConfig",
           "UsageError", "canonical_dataset", "field_names", "identity_mismatch", "paper_defaults",
           "resolve", "run_unused_fields", "unused_fields"]
