"""PPCRegistration in the browser: the Slicer module's workflow on real Slicer views (trame-slicer), served by
``bash scripts/app.sh`` (``python -m PPCRegistrationWeb``).

``app``: the page and its callbacks (one user session at a time; a second tab gets a "busy" page);
``views``: the Slicer views (the X-ray slice view on the detector plane and the 3D view) and screenshots;
``plots``: the per-iteration plot and the attention-weight histogram as PNG images.

The registration itself is ``PPCRegistrationLogic`` (the Slicer module's Qt-free logic): this package only
adapts it to a web page.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULE = os.path.join(_ROOT, "PPCRegistration")  # PPCRegistrationLogic lives in the Slicer module's folder
if os.path.isdir(_MODULE) and _MODULE not in sys.path:
    sys.path.append(_MODULE)
