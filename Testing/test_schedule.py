"""A method as data (PPCRegistrationLib.schedule): the named methods' schedules, their validation, and a
registration walking a hand-made schedule on the real lumbar CT."""

from __future__ import annotations



import pytest
import torch

from PPCRegistrationLib import methods
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.matchers import ClassicMatcher
from PPCRegistrationLib.networks import LearnedOperator
from PPCRegistrationLib.registration import Registration, RegistrationConfig
from PPCRegistrationLib.schedule import Attempt, PPCPhase, Schedule, single_schedule
from PPCRegistrationLib.simulation import ViewSampler, make_case


def test_classic_schedule_is_six_attempts_of_one_phase():
    s = methods.resolve_method("classic").schedule(RegistrationConfig().updated({"guards.max_iterations": 12}))
    assert s.name == "classic" and len(s.attempts) == 6
    first, retry, *tilted = s.attempts
    assert first.tilt_deg == retry.tilt_deg == (0.0, 0.0)
    assert [a.tilt_deg for a in tilted] == [(10.0, 0.0), (0.0, 10.0), (-10.0, 0.0), (0.0, -10.0)]
    assert all(a.prealign and not a.thorough and not a.patience and a.refines for a in tilted)
    untilted = methods.resolve_method("classic").schedule(RegistrationConfig().updated({"restart.tilt_deg": 0}))
    assert len(untilted.attempts) == 2
    assert first.prealign and first.thorough and not first.patience and first.refines
    assert not retry.prealign and retry.patience and not retry.thorough
    assert [p.config.solver.kind for p in first.phases] == ["robust"]
    assert first.phases[0].config.guards.max_iterations == 12
    assert isinstance(first.phases[0].matcher, ClassicMatcher)
    lines = s.describe()
    assert lines[0].startswith("attempt 1: 2D pre-alignment -> classic PPC updates, robust solve -> intensity")
    assert "stopping on a falling similarity" in lines[1] and "without the 2D pre-alignment" in lines[1]
    assert "tilted +10 degrees about the detector's u axis" in lines[2] and "v axis" in lines[5]


def test_learned_alone_and_chained_schedules():
    op = LearnedOperator("ppc-flow")
    alone = methods.resolve_method("ppc-flow", operator=op).schedule(RegistrationConfig())
    assert len(alone.attempts) == 1 and not alone.attempts[0].refines
    (phase,) = alone.attempts[0].phases
    assert phase.name == "ppc-flow" and phase.config.solver.kind == "plain" and phase.config.prealign.search_px == 0

    chain = methods.resolve_method("ppc-flow+classic", operator=op, learned_steps=2, switch_mm=0.3).schedule()
    assert chain.name == "ppc-flow+classic" and len(chain.attempts) == 7
    learned, classic = chain.attempts[0].phases
    assert (learned.name, learned.max_updates, learned.switch_mm) == ("ppc-flow", 2, 0.3)
    assert classic.name == "classic" and classic.config.solver.kind == "robust"
    # the fallback attempts are the classic schedule's, described
    plain = methods.resolve_method("classic").schedule()
    for a, c in zip(chain.attempts[1:], plain.attempts):
        assert (a.prealign, a.patience, a.thorough) == (c.prealign, c.patience, c.thorough) and a.description
    off = methods.resolve_method("ppc-flow+classic", operator=op, classic_fallback=False).schedule()
    assert len(off.attempts) == 2 and off.attempts[1].patience


def test_schedule_validation():
    cfg = RegistrationConfig()
    with pytest.raises(InputError, match="at least one PPC phase"):
        Attempt(())
    with pytest.raises(InputError, match="at least one attempt"):
        Schedule("x", ())
    with pytest.raises(InputError, match="max_updates >= 0"):
        PPCPhase(cfg, max_updates=-1)
    with pytest.raises(InputError, match="tilt_deg needs two angles"):
        Attempt((PPCPhase(cfg),), tilt_deg=(95.0, 0.0))
    with pytest.raises(InputError, match="tilt_deg must be in"):
        RegistrationConfig().updated({"restart.tilt_deg": -1})
    assert len(single_schedule(cfg.updated({"refine.iterations": 0})).attempts) == 1
    phase = PPCPhase(cfg, max_updates=2, switch_mm=0.5)
    assert not phase.ends_after(1, 1.0) and phase.ends_after(2, 1.0) and phase.ends_after(1, 0.2)


def test_registration_walks_a_hand_made_schedule(lumbar_l3):
    """Two classic phases (two plain weighted solves, then robust ones) on the real lumbar CT: the history names the
    phases in order, reset returns to the first, and a schedule with a config or matcher besides is refused."""
    ct, roi, renderer, surface = lumbar_l3
    case = make_case(renderer, surface.points, 0, (5, 10), ViewSampler(detector_size_px=128))
    base = RegistrationConfig(device="cpu").updated({"guards.max_iterations": 5, "guards.tolerance_mm": 0.0,
                                                     "refine.iterations": 0})
    plain = PPCPhase(base.updated({"method": "plain-classic", "solver.kind": "plain", "prealign.search_px": 0.0}),
                     max_updates=2)
    robust = PPCPhase(base)
    schedule = Schedule("two-phase", (Attempt((plain, robust)),))
    reg = Registration(ct, case.xray, case.projection, case.T_init, roi, T_gt=case.T_gt, surface=surface,
                       renderer=renderer, schedule=schedule)
    assert reg.phase is plain and reg.config.solver.kind == "plain"
    res = reg.run()
    ops = [st.operator for st in res.history]
    assert ops[:2] == ["plain-classic"] * 2 and set(ops[2:]) == {"classic"} and len(ops) == 5
    assert reg.phase is robust and res.status == "max_iterations"
    assert reg.mtre(res.T.to(reg.device)) < case.initial_mtre_mm
    reg.reset()
    assert reg.phase is plain and reg.iteration == 0 and torch.equal(reg.T.cpu(), case.T_init.double())
    with pytest.raises(InputError, match="not both"):
        Registration(ct, case.xray, case.projection, case.T_init, roi, base, surface=surface, renderer=renderer,
                     schedule=schedule)
