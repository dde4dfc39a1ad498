"""The ``ppcreg`` command line: sample data, simulated cases, registration, evaluation and benchmarks.

Subcommands (``ppcreg <command> --help`` for the options of each):

* ``sample-data``: download (once) the sample chest CT with its vertebra label map and print the paths.
* ``simulate``: a simulated case: random C-arm view, X-ray simulated at the ground truth, random initial
  estimate with a chosen initial mTRE.
* ``register``: register a CT to an X-ray from an initial estimate; writes ``result.json``,
  ``transform.json`` and ``overlay.png``.
* ``evaluate``: the evaluation protocol of docs/design.md §6 (:mod:`PPCRegistrationLib.evaluation`).
* ``bench``: timings of the DRR renderer and of the stages of one classic update step.
* ``make-dataset``: generate (or resume) a split of the learned operator's training data (docs/dataset.md).
* ``train``: train a learned update operator (also under ``torchrun`` on several GPUs/nodes).
* ``train-learned``, ``adapt``: the learned operator alone (``learned``) trained on its own trajectories, and its
  adaptation to one pre-operative CT (:mod:`.cli_learned`).

``register`` and ``evaluate`` take the methods of :mod:`PPCRegistrationLib.methods`: ``classic``, the learned
``flow``, ``ppc-flow``, ``ppc-flow-attention`` (model files, default ``Resources/Models/<learned>.pt``) and the
chained ``<learned>+classic``.

World coordinates are those of the CT file as SimpleITK reads it (LPS millimetres).  Transform and geometry
files that say ``"frame": "RAS"`` (e.g. written from Slicer) are converted to LPS on reading.

Errors the user can fix (:class:`~PPCRegistrationLib.errors.PPCError`) are printed as ``error: <message>``
and give the exit code 2, without a traceback.

This module builds the parser and runs the sub-command; the sub-commands live in :mod:`.cli_register`
(``sample-data``, ``simulate``, ``register``, ``evaluate``, ``join-evaluations``), :mod:`.cli_bench` (``bench``) and
:mod:`.cli_train` (``make-dataset``, ``train``), their shared helpers in :mod:`.cli_common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import __version__, cli_bench, cli_learned, cli_methods, cli_register, cli_train
from .cli_common import EXIT_ERROR, EXIT_OK, _positive_int, _torch
from .errors import PPCError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppcreg",
        description="Single-view rigid 2D/3D registration of a CT to an X-ray with the Point-to-Plane "
                    "Correspondence (PPC) model.",
        epilog="World coordinates are the CT file's (LPS mm, as SimpleITK reads it). Environment: PPCREG_CACHE "
               "(sample data cache). Errors in the input are reported as 'error: ...' with exit code 2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--threads", type=_positive_int("--threads"),
                        default=int(os.environ.get("PPCREG_THREADS", "1")),
                        help="CPU threads for torch (default $PPCREG_THREADS or 1: the renderer issues many small "
                             "operations, and on a shared 2-core machine two threads were measured ten times "
                             "slower than one)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    cli_register.add_parsers(sub)  # sample-data, simulate, register, evaluate, join-evaluations
    cli_methods.add_parser(sub)  # methods
    cli_bench.add_parser(sub)  # bench
    cli_train.add_parsers(sub)  # make-dataset, train
    cli_learned.add_parsers(sub)  # train-learned, adapt
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ppcreg`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_ERROR
    _torch().set_num_threads(args.threads)
    try:
        return int(args.func(args) or EXIT_OK)
    except PPCError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except OSError as exc:  # cannot write an output file, disk full, ...
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr,
              flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
