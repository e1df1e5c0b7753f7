"""fastssl: self-supervised image-representation training with a GPU data pipeline."""

import os as _os

# The top-level kernels/ folder is the package ``fastssl.kernels`` (setup.py's package_dir).
# When fastssl runs from a checkout without being installed, find it there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

__version__ = "0.1.0"
