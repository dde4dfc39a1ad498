"""PPCRegistrationLib: single-view rigid 2D/3D registration of a CT to an X-ray with the Point-to-Plane
Correspondence model (classic and learned update operators).  Pure Python + torch; no Slicer, Qt or VTK.

The public API is a few nouns (docs/design.md §7; an example in :mod:`PPCRegistrationLib.api`):

* reading: :func:`read_volume`, :func:`read_xray`, :func:`read_geometry`, :func:`read_transform`,
  :func:`vertebra_roi`, :class:`BoxROI`;
* registering: :func:`register` (one call), or :class:`Registration` with a :class:`RegistrationConfig` (step by
  step: ``step``, ``run``, ``stop``, ``reset``, ``history``);
* a method as data: :func:`resolve_method` by name and its :meth:`~.methods.Method.schedule`, a :class:`Schedule` of
  :class:`Attempt` s of :class:`PPCPhase` s that :class:`Registration` walks (``schedule=``);
* the update operator itself: :func:`ppc_update` with :class:`UpdateState`, a matcher and a solver;
* simulation and measures: :func:`simulate_case`, :func:`mtre`, :func:`mrpd`, :class:`DRRRenderer`.
"""

__version__ = "0.1.0"

from .api import read_geometry, read_transform, register, simulate_case, vertebra_roi
from .config import RegistrationConfig, RegistrationResult, Status
from .drr import DRRRenderer
from .io import read_volume, read_xray
from .methods import resolve_method
from .metrics import mrpd, mtre
from .registration import Registration
from .roi import BoxROI
from .schedule import Attempt, PPCPhase, Schedule
from .update import UpdateState, ppc_update

__all__ = ["read_volume", "read_xray", "read_geometry", "read_transform", "vertebra_roi", "BoxROI", "register",
           "Registration", "RegistrationConfig", "RegistrationResult", "Status", "resolve_method", "Schedule", "Attempt",
           "PPCPhase", "ppc_update", "UpdateState",
           "simulate_case", "mtre", "mrpd", "DRRRenderer", "__version__"]
