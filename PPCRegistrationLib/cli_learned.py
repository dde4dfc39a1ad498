"""``ppcreg train-learned`` and ``ppcreg adapt``: the learned operator alone (docs/design.md §5.4), trained on its own
trajectories over training patients, and adapted to one pre-operative CT (:mod:`.learned_recipe`)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .cli_common import EXIT_OK, _check_file, _nonneg_float, _positive_int, _say
from .errors import InputError

_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _patient(text: str):
    """``NAME=CT,LABELS,V1:V2:...`` or a known patient name (sample, popi_thorax, lidc0314_chest)."""
    from .learned_recipe import PatientSpec

    known = {"sample": None, "popi_thorax": ("T4", "T6", "T8", "T10"), "lidc0314_chest": ("T6", "T9")}
    if "=" not in text:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown patient {text!r}: give NAME=CT,LABELS,V1:V2 or one of "
                                             f"{', '.join(known)}")
        if text == "sample":
            from . import sample_data

            p = sample_data.fetch(progress=False)
            return PatientSpec("sample_chest", str(p["ct"]), str(p["labels"]), ("T6", "T8", "T10", "T12", "L1"))
        folder = _DATA / text
        return PatientSpec(text, str(folder / "ct.nii.gz"), str(folder / "labels.nii.gz"), known[text])
    name, rest = text.split("=", 1)
    parts = rest.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a patient is NAME=CT,LABELS,V1:V2:..., got {text!r}")
    return PatientSpec(name, parts[0], parts[1], tuple(v for v in parts[2].split(":") if v))


class _Progress:
    """A one-line progress report on stderr (step, loss, the rollouts' median mTRE)."""

    def __init__(self, quiet: bool, budget: float | None, steps: int) -> None:
        self.quiet, self.budget, self.steps = quiet, budget, steps

    def __call__(self, step: int, numbers: dict) -> None:
        if self.quiet or step % 10:
            return
        nums = ", ".join(f"{k} {v:.3g}" for k, v in numbers.items())
        print(f"\rstep {step}: {nums}", end="", file=sys.stderr, flush=True)


class _StopOnSignal:
    """While active, Ctrl-C (SIGINT) or SIGTERM asks the run to stop after its current step (a callable
    ``should_stop``); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict = {}

    def _handler(self, _sig, _frame) -> None:
        self.stop = True
        print("\nstopping after this step (the previous model file is kept) ...", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self) -> bool:
        return self.stop


def _report(res: dict) -> int:
    if res["status"] == "cancelled":
        _say(f"cancelled after {res['steps']} steps; the checkpoint {res['checkpoint']} resumes it")
        return EXIT_OK
    best = res.get("best") or {}
    _say(f"wrote {res['model']} after {res['steps']} steps"
         + (f": validation {100 * best['success']:.0f} % below 2 mm, median {best['median_mm']:.2f} mm"
            if best else ""))
    _say(f"  model card: {Path(res['model']).with_suffix('.md')}")
    return EXIT_OK


def _cmd_train_learned(args) -> int:
    from .learned_recipe import train_learned
    from .trajectory_training import TrajectoryConfig

    train = args.train or []
    if not train:
        raise InputError("give the training patients with --train (e.g. --train sample --train popi_thorax)")
    for p in list(train) + list(args.val or []):
        _check_file(p.ct, f"CT of {p.name}")
        _check_file(p.labels, f"label map of {p.name}")
    cfg = TrajectoryConfig(steps=args.steps, time_budget_s=args.budget, out_of_plane=args.out_of_plane,
                           ppc_weight=args.ppc_weight, seed=args.seed)
    with _StopOnSignal() as stop:
        res = train_learned(train, args.val or [], args.out, config=cfg, resume=not args.no_resume,
                            val_cases=args.val_cases, should_stop=stop,
                            progress=_Progress(args.quiet, args.budget, args.steps), log=_say,
                            init=_check_file(args.init, "--init model"))
    return _report(res)


def _cmd_adapt(args) -> int:
    from .learned_recipe import adapt
    from .methods import default_model_path

    init = _check_file(args.model, "--model") if args.model else str(default_model_path("learned"))
    extra = {} if args.val_cases is None else {"val_cases": args.val_cases}
    with _StopOnSignal() as stop:
        res = adapt(_check_file(args.ct, "CT"), _check_file(args.labels, "label map"), args.vertebra, args.out,
                    init=init, budget_s=args.budget, resume=not args.no_resume, **extra,
                    should_stop=stop, progress=_Progress(args.quiet, args.budget, 0), log=_say)
    return _report(res)


def add_parsers(sub) -> None:
    p = sub.add_parser("train-learned", help="train the learned operator alone on its own trajectories",
                       description="Train the learned normal matcher (method `learned`) on the states its own loop "
                                   "visits: unrolled updates through the PPC solve from fresh starts and from poses "
                                   "earlier rollouts reached (docs/design.md §5.4). Patients: sample, popi_thorax, "
                                   "lidc0314_chest, or NAME=CT,LABELS,V1:V2. Validates on --val patients (never the "
                                   "test patient); checkpoints and resumes; Ctrl-C stops and keeps the previous model.")
    p.add_argument("--train", type=_patient, action="append", metavar="PATIENT", help="a training patient (repeat)")
    p.add_argument("--val", type=_patient, action="append", metavar="PATIENT", help="a validation patient (repeat)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (learned.pt, learned.md, curves)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=100000, help="optimiser steps (default: until "
                   "the budget)")
    p.add_argument("--budget", type=_nonneg_float("--budget"), default=2400.0, metavar="S",
                   help="time budget in seconds (default 2400)")
    p.add_argument("--out-of-plane", type=_nonneg_float("--out-of-plane"), default=0.0,
                   help="out-of-plane damping of the PPC solve trained through (default 0: the plain pseudo-inverse)")
    p.add_argument("--ppc-weight", type=_nonneg_float("--ppc-weight"), default=1.0,
                   help="weight of log(1 + mTRE after the solve) in the loss, beside the displacement's cross-entropy "
                        "(default 1)")
    p.add_argument("--val-cases", type=_positive_int("--val-cases"), default=12,
                   help="validation cases (iterated alone from [0, 20] mm; default 12)")
    p.add_argument("--init", metavar="MODEL.pt", help="fine-tune this model instead of starting afresh")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train_learned)

    p = sub.add_parser("adapt", help="adapt the learned operator to one pre-operative CT",
                       description="Fine-tune the learned operator (method `learned`) on DRRs of this CT: the vertebra "
                                   "and its labelled neighbours, random views and poses, within a time budget; "
                                   "validated on cases of the same CT from seeds disjoint from the evaluation's. "
                                   "Writes DIR/learned.pt and its model card; use it with --model learned=DIR/learned.pt. "
                                   "Resumes from DIR/learned.ckpt.pt; Ctrl-C stops and keeps an existing model.")
    p.add_argument("--ct", required=True, help="the pre-operative CT (HU)")
    p.add_argument("--labels", required=True, help="its vertebra label map (TotalSegmentator v2 ids)")
    p.add_argument("--vertebra", required=True, help="the vertebra to register, e.g. L3")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model", metavar="MODEL.pt", help="the model to adapt (default the shipped learned.pt)")
    p.add_argument("--budget", type=_nonneg_float("--budget"), default=900.0, metavar="S",
                   help="time budget in seconds (default 900: 15 minutes)")
    p.add_argument("--val-cases", type=_positive_int("--val-cases"), default=None,
                   help="validation cases of this CT, the starting model scored too (seeds disjoint from the "
                        "evaluation's; default learned_recipe.ADAPT_VAL_CASES, 16)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_adapt)
