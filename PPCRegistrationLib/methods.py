"""Registration methods by name: the classic PPC operator, the three learned operators of the paper, and the
chained pipelines ``<learned>+classic`` (docs/design.md §1: "iterate the operator or chain several operators").

=============================== ===========================================================================
``classic``                     classic matching along the normals, robust solver, global 2D pre-alignment
``flow``, ``ppc-flow``,         the learned operator (:class:`~PPCRegistrationLib.networks.LearnedMatcher`
``ppc-flow-attention``          from a model file), one plain weighted PPC solve per update as in training,
                                no pre-alignment: one update is the raw learned operator of Table 1
``learned``                     the learned normal matcher running alone (:mod:`~PPCRegistrationLib.normal_matcher`,
                                trained on its own trajectories): its PPC solve as trained, no pre-alignment,
                                no classic update, no intensity refinement
``<learned>+classic``           learned updates first (at most ``learned_steps``, or until a learned update
                                moves the targets by less than ``switch_mm``), then classic robust updates
                                for the remaining iterations
=============================== ===========================================================================

Model files: by default ``Resources/Models/<learned>.pt`` next to the library (the repository's
``Resources/Models``, or the extension's ``Resources/Models`` once installed in Slicer); any other file can be
given.  A missing or damaged file is a :class:`~PPCRegistrationLib.errors.ModelFileError` that names the file
and says how to get one.

Typical use::

    method = resolve_method("ppc-flow-attention+classic", device="cpu")   # loads the model once
    reg = method.registration(ct, xray, projection, T_init, roi, RegistrationConfig(max_iterations=30))
    result = reg.run()
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .devices import resolve_device
from .errors import InputError, ModelFileError
from .model_files import load_model
from .networks import LEARNED_METHODS, LearnedMatcher, LearnedOperator, operator_from_file
from .normal_matcher import NORMAL_METHOD, NormalMatcher, NormalMatcherNet
from .registration import ClassicMatcher, Matcher, Registration, RegistrationConfig
from .schedule import Attempt, PPCPhase, Schedule, single_schedule

__all__ = ["CLASSIC", "NORMAL_METHOD", "LEARNED_METHODS", "CHAINED_METHODS", "ALL_METHODS", "METHOD_LABELS", "LEARNED_SEARCH_PX",
           "DEFAULT_LEARNED_STEPS", "DEFAULT_SWITCH_MM", "learned_search_px", "learned_window_px", "learned_config",
           "normalize_method", "parse_methods", "learned_part", "default_models_dir", "default_model_path",
           "load_operator", "method_config", "Method", "resolve_method", "build_registration",
           "models_from_mapping"]

CLASSIC = "classic"
#: ``<learned>+classic`` for every learned operator.
CHAINED_METHODS = tuple(f"{m}+{CLASSIC}" for m in LEARNED_METHODS)
#: every method name :func:`resolve_method` accepts (after :func:`normalize_method`).
ALL_METHODS = (CLASSIC, NORMAL_METHOD, *LEARNED_METHODS, *CHAINED_METHODS)
#: names shown to users (Slicer's method menu, report tables).
METHOD_LABELS = {
    CLASSIC: "Classic PPC",
    NORMAL_METHOD: "Learned operator (alone)",
    "flow": "Flow",
    "ppc-flow": "PPC Flow",
    "ppc-flow-attention": "PPC Flow Attention",
    "flow+classic": "Flow + classic refinement",
    "ppc-flow+classic": "PPC Flow + classic refinement",
    "ppc-flow-attention+classic": "PPC Flow Attention + classic refinement",
}
#: detector pixels: search range of a learned method when its operator's reach is not known (window margin and
#: plausibility limit of the learned matches); :func:`learned_search_px` gives the reach of an operator.
LEARNED_SEARCH_PX = 32.0
#: a chained pipeline's learned updates before it switches to classic refinement (at most). One: with the version 1
#: CPU-trained models, 100 lumbar cases in [0, 45] mm reached < 2 mm in 15-18 % of the cases after one learned
#: update and classic refinement, 5-7 % after ten learned updates (the learned operator drifts when iterated); with
#: the stride-16 Flow (version 3, at step 2,750) on 30 lumbar cases in [20, 45] mm: 30 % after one, 27 % after three.
DEFAULT_LEARNED_STEPS = 1
#: a chained pipeline switches to classic refinement after a learned update smaller than this (mm).
DEFAULT_SWITCH_MM = 0.5


def normalize_method(name: str) -> str:
    """The canonical method name: case, blanks and ``_`` are forgiven (``PPC_Flow + classic`` ->
    ``ppc-flow+classic``).

    Raises:
        InputError: an unknown method (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise InputError(f"a method name must be a string, got {type(name).__name__}")
    key = "+".join(part.strip().replace("_", "-").replace(" ", "-") for part in name.strip().lower().split("+"))
    if key not in ALL_METHODS:
        raise InputError(f"unknown method {name!r}; available: {', '.join(ALL_METHODS)}")
    return key


def parse_methods(methods: str | Iterable[str]) -> list[str]:
    """Method names from ``"classic,flow"`` or ``["classic", "flow,ppc-flow"]``: split at commas, normalised,
    duplicates dropped (first occurrence kept)."""
    items = [methods] if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                m = normalize_method(part)
                if m not in out:
                    out.append(m)
    if not out:
        raise InputError(f"no method given; available: {', '.join(ALL_METHODS)}")
    return out


def learned_part(method: str) -> str | None:
    """The learned operator a method uses (``"ppc-flow"`` for ``ppc-flow+classic``), None for ``classic``."""
    m = normalize_method(method)
    first = m.split("+")[0]
    return first if first in LEARNED_METHODS or first == NORMAL_METHOD else None


def default_models_dir() -> Path:
    """``Resources/Models`` next to the library's folder: the repository's, or the installed extension's."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def default_model_path(method: str, models_dir: str | Path | None = None) -> Path:
    """``<models_dir>/<learned>.pt`` (default :func:`default_models_dir`) of a learned or chained method."""
    learned = learned_part(method)
    if learned is None:
        raise InputError(f"method {method!r} uses no model file")
    folder = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    return folder / f"{learned}.pt"


def load_operator(method: str, model_path: str | Path | None = None, device: torch.device | str = "cpu",
                  models_dir: str | Path | None = None) -> tuple[LearnedOperator | NormalMatcherNet, dict, Path]:
    """Load and check the learned operator of a method.

    Args:
        method: a learned or chained method name.
        model_path: the model file; default :func:`default_model_path` (in ``models_dir``).
        device: where the operator runs.
    Returns:
        ``(operator, meta, path)``.
    Raises:
        ModelFileError: the file is missing (the message says how to get one), damaged, not a model file, or
            holds another method's operator.
    """
    learned = learned_part(method)
    if learned is None:
        raise InputError(f"method {method!r} uses no learned operator")
    path = Path(model_path).expanduser() if model_path else default_model_path(learned, models_dir)
    if not path.is_file():
        where = "given" if model_path else "default"
        raise ModelFileError(
            f"the model file of method {learned!r} was not found: {path} ({where} path). Train one with "
            f"`ppcreg {'train-learned' if learned == NORMAL_METHOD else 'train'}` (see its --help) and save it "
            f"there, or give another file "
            f"(ppcreg: --model / --models-dir; Slicer: the 'Model file' field)")
    if learned == NORMAL_METHOD:
        net, meta = load_model(path, "normal_matcher", device)
        return net, meta, path
    op, meta = operator_from_file(path, device, method=learned)
    return op, meta, path


def normal_config(net: NormalMatcherNet, meta: dict | None = None, base: RegistrationConfig | None = None
                  ) -> RegistrationConfig:
    """The settings of the learned operator alone (``learned``): the PPC solve it was trained through
    (``meta["solver"]``: out-of-plane damping and Tikhonov term, default the plain pseudo-inverse 0 / 1e-5), a window
    of the region's bounding box plus its profiles' reach, no pre-alignment, no refinement."""
    solver = dict((meta or {}).get("solver", {}))
    reach = net.search + net.half + 4
    cfg = method_config(NORMAL_METHOD, base, search_px=float(net.search))
    return cfg.updated({"solver.kind": str(solver.get("kind", "plain")),
                        "solver.plain_out_of_plane": float(solver.get("out_of_plane", 0.0)),
                        "solver.damping_min": float(solver.get("regularization", 1e-5)),
                        "matching.window_margin_px": int(reach - net.search)})


def learned_search_px(operator: LearnedOperator, pixel_spacing_mm: float | None = None) -> float:
    """The reach of a learned operator in detector pixels of ``pixel_spacing_mm``: its correlation range
    (``max_disp * stride`` network pixels) times the image-to-network reduction (at least 8 pixels)."""
    net = operator.flow_net
    return max(8.0, float(net.max_disp * net.stride) * operator.factor_for(pixel_spacing_mm))


def learned_window_px(operator: LearnedOperator, pixel_spacing_mm: float | None = None) -> int:
    """The detector window (pixels of ``pixel_spacing_mm``) a learned operator was trained on: its ``window_px`` network
    pixels times the image-to-network reduction; 0 when its model file does not record it."""
    if operator.window_px is None:
        return 0
    return int(round(operator.window_px * operator.factor_for(pixel_spacing_mm)))


def method_config(method: str, base: RegistrationConfig | None = None,
                  search_px: float | None = None, window_px: int = 0) -> RegistrationConfig:
    """The registration settings of a method: ``base`` (default :class:`RegistrationConfig`) with the
    method's overrides.  For a chained method these are the settings of its *learned* phase; the classic phase
    uses ``base`` with ``method="classic"``.

    Learned: ``solver.kind="plain"`` (one weighted PPC solve, as in training), no 2D pre-alignment, no intensity
    refinement (a learned operator alone is evaluated as it is; a chain's classic phase refines), and a fixed
    search range ``search_px`` (default :data:`LEARNED_SEARCH_PX`; :meth:`Method.registration` uses the
    operator's reach, :func:`learned_search_px`): matches displaced farther are dropped, and the window rendered
    around the region of interest has that margin (plus ``window_margin_px``), unless ``window_px`` > 0: then the
    window is a square of that many detector pixels centred on the region, as the operator was trained
    (:func:`learned_window_px`).
    """
    m = normalize_method(method)
    base = base or RegistrationConfig()
    if m == CLASSIC:
        return replace(base, method=CLASSIC)
    s = float(LEARNED_SEARCH_PX if search_px is None else search_px)
    return base.updated({"method": learned_part(m), "solver.kind": "plain", "prealign.search_px": 0.0,
                         "matching.search_px": s, "matching.min_search_px": s, "refine.iterations": 0,
                         "matching.window_px": int(window_px)})


def learned_config(operator: LearnedOperator, base: RegistrationConfig | None = None,
                   pixel_spacing_mm: float | None = None) -> RegistrationConfig:
    """The settings of ``operator``'s updates (:func:`method_config`) with its reach (:func:`learned_search_px`)
    and training window (:func:`learned_window_px`) on a detector of ``pixel_spacing_mm``."""
    return method_config(operator.method, base, learned_search_px(operator, pixel_spacing_mm),
                         learned_window_px(operator, pixel_spacing_mm))


@dataclass
class Method:
    """A resolved method: its name and, for learned and chained methods, the loaded operator.

    Build with :func:`resolve_method` (loads the model once); :meth:`registration` then makes one
    registration per case.
    """

    name: str
    operator: LearnedOperator | NormalMatcherNet | None = None
    model_path: Path | None = None
    model_meta: dict | None = None
    learned_steps: int = DEFAULT_LEARNED_STEPS
    switch_mm: float = DEFAULT_SWITCH_MM
    classic_fallback: bool = True

    @property
    def learned(self) -> str | None:
        return learned_part(self.name)

    @property
    def chained(self) -> bool:
        return "+" in self.name

    @property
    def label(self) -> str:
        return METHOD_LABELS[self.name]

    def matcher(self) -> Matcher:
        """The 2D matching step of the (first) operator."""
        if self.learned is None:
            return ClassicMatcher()
        if self.operator is None:
            raise InputError(f"method {self.name!r} needs its learned operator: use resolve_method()")
        if isinstance(self.operator, NormalMatcherNet):
            return NormalMatcher(self.operator)
        return LearnedMatcher(self.operator)

    def config(self, base: RegistrationConfig | None = None, pixel_spacing_mm: float | None = None
               ) -> RegistrationConfig:
        """The (first phase's) settings, see :func:`method_config`; the learned search range is the operator's
        reach on a detector of ``pixel_spacing_mm``."""
        if self.operator is None:
            return method_config(self.name, base)
        if isinstance(self.operator, NormalMatcherNet):
            return normal_config(self.operator, self.model_meta, base)
        return learned_config(self.operator, base, pixel_spacing_mm)

    def schedule(self, base: RegistrationConfig | None = None, pixel_spacing_mm: float | None = None) -> Schedule:
        """The method as data (docs/design.md §4.5): its attempts and their PPC phases, with ``base``'s common
        settings (iterations, tolerance, device, ...; its ``method`` is ignored) on a detector of
        ``pixel_spacing_mm``.

        ``classic`` and a learned operator alone: one phase (:func:`~PPCRegistrationLib.schedule.single_schedule`).
        ``<learned>+classic``: attempt 1 is ``learned_steps`` learned updates (fewer after one below ``switch_mm``),
        then classic PPC updates and the refinement; with the classic fallback, the next attempts are the classic
        registration's, exactly as it runs alone (the tilted restarts included); without it, only classic's retry.
        """
        base = base or RegistrationConfig()
        first = self.config(base, pixel_spacing_mm)
        if not self.chained:
            return single_schedule(first, self.matcher())
        classic = single_schedule(method_config(CLASSIC, base), ClassicMatcher())
        learned = PPCPhase(first, self.matcher(), max_updates=self.learned_steps, switch_mm=self.switch_mm)
        chain = Attempt((learned, classic.attempts[0].phases[0]), prealign=False, thorough=True)
        fallback = [replace(a, description=d) for a, d in zip(classic.attempts, (
            "from the initial estimate with the classic registration (2D pre-alignment and classic PPC updates)",
            "from the initial estimate with classic PPC updates without the 2D pre-alignment"))] + list(classic.attempts[2:])
        return Schedule(self.name, (chain, *(fallback if self.classic_fallback else fallback[1:2])))

    def registration(self, ct, xray, projection, T_init, roi=None, config: RegistrationConfig | None = None, *,
                     T_gt=None, surface=None, renderer=None) -> Registration:
        """A :class:`Registration` of this method's :meth:`schedule`.

        ``config`` holds the common settings (iterations, tolerance, device, ...); its ``method`` is ignored.
        """
        base = config or RegistrationConfig()
        if self.operator is not None:
            dev = base.resolved_device()
            if next(self.operator.parameters()).device.type != dev.type:
                self.operator.to(dev)
        schedule = self.schedule(base, float(projection.pixel_spacing[0, 0]))
        return Registration(ct, xray, projection, T_init, roi, T_gt=T_gt, surface=surface, renderer=renderer,
                            schedule=schedule)


def resolve_method(name: str, *, model_path: str | Path | None = None, models_dir: str | Path | None = None,
                   device: torch.device | str = "cpu", operator: LearnedOperator | NormalMatcherNet | None = None,
                   learned_steps: int = DEFAULT_LEARNED_STEPS, switch_mm: float = DEFAULT_SWITCH_MM,
                   classic_fallback: bool = True) -> Method:
    """A :class:`Method` by name, with its learned operator loaded (and checked) when it has one.

    Args:
        name: a method name (see :data:`ALL_METHODS`; :func:`normalize_method` forgives case and ``_``).
        model_path: model file of the learned operator (default ``<models_dir>/<learned>.pt``).
        models_dir: folder of the default model files (default :func:`default_models_dir`).
        device: where the operator runs (``"auto"`` = CUDA when available).
        operator: an operator already in memory (no file is read).
        learned_steps, switch_mm: when a chained method switches to classic refinement.
        classic_fallback: a chained method whose result correlates poorly with the X-ray runs the classic
            registration from the initial estimate (see :meth:`Method.schedule`).
    Raises:
        InputError: unknown method or bad parameters.  ModelFileError: missing or damaged model file.
    """
    m = normalize_method(name)
    if int(learned_steps) < 1:
        raise InputError(f"learned_steps must be at least 1, got {learned_steps}")
    if not float(switch_mm) >= 0:
        raise InputError(f"switch_mm must be >= 0 (mm), got {switch_mm}")
    out = Method(m, learned_steps=int(learned_steps), switch_mm=float(switch_mm),
                 classic_fallback=bool(classic_fallback))
    learned = learned_part(m)
    if learned is None:
        return out
    dev = resolve_device(str(device))
    if operator is not None:
        if isinstance(operator, NormalMatcherNet) != (learned == NORMAL_METHOD) or \
                getattr(operator, "method", learned) != learned:
            raise ModelFileError(f"the given operator is a {getattr(operator, 'method', NORMAL_METHOD)!r} model, "
                                 f"but method {m!r} needs {learned!r}")
        out.operator = operator.to(dev).eval()
        return out
    out.operator, out.model_meta, out.model_path = load_operator(learned, model_path, dev, models_dir)
    return out


def build_registration(method: str, ct, xray, projection, T_init, roi=None,
                       config: RegistrationConfig | None = None, *, model_path: str | Path | None = None,
                       models_dir: str | Path | None = None, operator: LearnedOperator | None = None,
                       learned_steps: int = DEFAULT_LEARNED_STEPS, switch_mm: float = DEFAULT_SWITCH_MM,
                       classic_fallback: bool = True, T_gt=None, surface=None, renderer=None) -> Registration:
    """One call from a method name to a ready :class:`Registration` (loads the model file of learned methods
    on ``config.device``).  For many cases of one method, :func:`resolve_method` once and
    :meth:`Method.registration` per case."""
    base = config or RegistrationConfig()
    m = resolve_method(method, model_path=model_path, models_dir=models_dir, device=base.resolved_device(),
                       operator=operator, learned_steps=learned_steps, switch_mm=switch_mm,
                       classic_fallback=classic_fallback)
    return m.registration(ct, xray, projection, T_init, roi, base, T_gt=T_gt, surface=surface, renderer=renderer)


def models_from_mapping(models: Mapping[str, str | Path] | None) -> dict[str, Path]:
    """``{learned operator: file}`` from ``{method: file}`` (chained names map to their learned operator)."""
    out: dict[str, Path] = {}
    for k, v in (models or {}).items():
        learned = learned_part(k)
        if learned is None:
            raise InputError(f"method {k!r} uses no model file")
        out[learned] = Path(v).expanduser()
    return out
