"""Qt-free part of the PPCRegistration Slicer module (runs in Slicer and on slicer-core's headless MRML).

``core``: the registration session writing output nodes, and (re-exported) ``nodes`` (MRML nodes <->
PPCRegistrationLib objects), ``carm`` (the C-arm geometry), ``display`` (what is drawn), ``settings``.
``scenario``: the simulated test scenario shared by the module's self-test and the pytest suite.
"""

import os
import sys

# Make PPCRegistrationLib importable when the module runs from the source tree (Slicer's "additional module
# paths" pointing at <repo>/PPCRegistration): the library then lives one folder up.  In an installed
# extension the library is copied next to PPCRegistration.py, which is already on sys.path.
try:
    import PPCRegistrationLib  # noqa: F401
except ImportError:
    _repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(_repo, "PPCRegistrationLib")) and _repo not in sys.path:
        sys.path.append(_repo)
