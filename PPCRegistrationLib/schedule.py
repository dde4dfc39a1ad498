"""A registration method as data (docs/design.md §4.5): a :class:`Schedule` is the list of attempts a registration
may make from the initial estimate (its restart policy), and each :class:`Attempt` is its stages: the 2D
pre-alignment, one or more phases of PPC updates (:class:`PPCPhase`: a matcher, a configuration whose ``solver``
names the solve, and when the phase ends), then the intensity refinement of the last phase's configuration.

:class:`~PPCRegistrationLib.registration.Registration` walks a schedule; it has no subclass per method.
:mod:`PPCRegistrationLib.methods` builds the schedules of the named methods::

    classic                     attempt 1: pre-align, classic PPC, refine  (+ thorough pass when poor)
                                attempt 2: classic PPC without pre-alignment, stop on a falling similarity, refine
                                attempts 3-6: from the initial estimate tilted +-10 degrees out of plane
    <learned>                   attempt 1: learned PPC (plain solve), no refinement
    <learned>+classic           attempt 1: 1 learned update, classic PPC, refine
                                attempts 2-7: classic's attempts (the classic fallback)

Keeping the best result by image similarity over all attempts (and the initial estimate) is part of every schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import RegistrationConfig
from .errors import InputError
from .matchers import ClassicMatcher, Matcher

__all__ = ["PPCPhase", "Attempt", "Schedule", "single_schedule"]


@dataclass(frozen=True)
class PPCPhase:
    """A phase of PPC updates with one matcher under one configuration.

    Attributes:
        config: the phase's settings (``solver``: ``"robust"`` or ``"plain"``, search range, window, guards, and for
            the last phase of an attempt the refinement); ``config.method`` names the operator in the history.
        matcher: the 2D matching step (:class:`~PPCRegistrationLib.matchers.ClassicMatcher`, a learned one).
        max_updates: a phase that is not its attempt's last ends after this many updates (0 = no own limit; every
            phase counts against ``config.guards.max_iterations``).
        switch_mm: ... or after an update that moved the targets less than this (mm; 0 = never).

    A phase that is not the last also ends after a failed update (converged, rank deficient, diverged: the estimate
    is then the best one) and the next phase goes on from there.
    """

    config: RegistrationConfig
    matcher: Matcher = field(default_factory=ClassicMatcher)
    max_updates: int = 0
    switch_mm: float = 0.0

    def __post_init__(self) -> None:
        if int(self.max_updates) < 0 or not float(self.switch_mm) >= 0:
            raise InputError(f"a PPC phase needs max_updates >= 0 and switch_mm >= 0 (mm), got {self.max_updates} and "
                             f"{self.switch_mm}")

    @property
    def name(self) -> str:
        """The operator of the phase (the history's ``IterationState.operator``)."""
        return self.config.method

    def ends_after(self, updates: int, update_mm: float) -> bool:
        """Whether a (non-last) phase is over after ``updates`` updates, the last of ``update_mm``."""
        return (self.max_updates > 0 and updates >= self.max_updates) or update_mm < self.switch_mm


@dataclass(frozen=True)
class Attempt:
    """One attempt from the initial estimate: the stages it runs, in order.

    Attributes:
        phases: the PPC phases (at least one); the refinement follows the last (its ``config.refine.iterations``).
        prealign: the 2D pre-alignment before the first update (when the first phase's ``coarse_search_px`` > 0).
        patience: the PPC updates stop, and revert to their best estimate, after ``retry_patience`` updates without a
            gain of image similarity (instead of ``patience``).
        thorough: a poorly correlating result gets the thorough full-resolution refinement of its PPC result before
            the next attempt (``refine_thorough_iterations``).
        tilt_deg: the attempt starts from the initial estimate rotated by these angles (degrees) about the detector's
            u and v axes (camera x and y) through the region of interest's centre (a multi-start over the out-of-plane
            rotations a single view sees worst); ``(0, 0)`` = the initial estimate itself.
        description: where the attempt starts and how, for the history's messages ("from the initial estimate without
            the 2D pre-alignment"; empty: from the initial estimate).
    """

    phases: tuple[PPCPhase, ...]
    prealign: bool = True
    patience: bool = False
    thorough: bool = True
    tilt_deg: tuple[float, float] = (0.0, 0.0)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.phases:
            raise InputError("an attempt needs at least one PPC phase")
        object.__setattr__(self, "phases", tuple(self.phases))
        tilt = tuple(float(a) for a in self.tilt_deg)
        if len(tilt) != 2 or not all(abs(a) < 90 for a in tilt):
            raise InputError(f"tilt_deg needs two angles (degrees, about the detector's u and v axes) below 90, got "
                             f"{self.tilt_deg}")
        object.__setattr__(self, "tilt_deg", tilt)

    @property
    def prealigns(self) -> bool:
        """Whether the attempt starts with the 2D pre-alignment (asked for, and on in its first phase)."""
        return self.prealign and self.phases[0].config.prealign.search_px > 0

    @property
    def refines(self) -> bool:
        """Whether the attempt ends with the intensity refinement (its last phase's ``refine.enabled``)."""
        return self.phases[-1].config.refine.enabled


@dataclass(frozen=True)
class Schedule:
    """A method: its name and the attempts its registration may make, in order (the restart policy).

    The first attempt always runs; the next one runs only when the previous result, once refined, correlates poorly
    with the X-ray (below ``retry_below_similarity`` or no better than the initial estimate).  Without refinement
    there is nothing to judge and only the first attempt runs.  At the end the registration keeps the best
    correlating of all results and the initial estimate.
    """

    name: str
    attempts: tuple[Attempt, ...]

    def __post_init__(self) -> None:
        if not self.attempts:
            raise InputError("a schedule needs at least one attempt")
        object.__setattr__(self, "attempts", tuple(self.attempts))

    def describe(self) -> list[str]:
        """One line per attempt: its stages (for logs and ``ppcreg methods``)."""
        lines = []
        for k, a in enumerate(self.attempts, 1):
            stages = ["2D pre-alignment"] if a.prealigns else []
            for p in a.phases:
                limit = f" (at most {p.max_updates})" if p.max_updates and p is not a.phases[-1] else ""
                stages.append(f"{p.name} PPC updates, {p.config.solver.kind} solve{limit}")
            if a.refines:
                stages.append("intensity refinement" + (" (+ thorough pass when poor)" if a.thorough else ""))
            if a.patience:
                stages[-1 if not a.refines else -2] += ", stopping on a falling similarity"
            lines.append(f"attempt {k}: " + " -> ".join(stages) + (f"  [{a.description}]" if a.description else ""))
        return lines


def single_schedule(config: RegistrationConfig, matcher: Matcher | None = None) -> Schedule:
    """The schedule of one operator (classic PPC, or a learned operator alone): one phase; when it refines, a
    retry without the 2D pre-alignment that stops on a falling similarity, then the tilted restarts of
    ``config.restart.tilt_deg`` (docs/design.md §4.4)."""
    phase = PPCPhase(config, matcher or ClassicMatcher())
    first = Attempt((phase,), prealign=True, thorough=True)
    if not first.refines:
        return Schedule(config.method, (first,))
    retry = Attempt((phase,), prealign=False, patience=True, thorough=False,
                    description="from the initial estimate without the 2D pre-alignment")
    a = float(config.restart.tilt_deg)
    tilts = [Attempt((phase,), prealign=True, thorough=False, tilt_deg=t,
                     description=f"from the initial estimate tilted {t[0] + t[1]:+g} degrees about the detector's "
                                 f"{'u' if t[0] else 'v'} axis")
             for t in ((a, 0.0), (0.0, a), (-a, 0.0), (0.0, -a))] if a > 0 else []
    return Schedule(config.method, (first, retry, *tilts))
