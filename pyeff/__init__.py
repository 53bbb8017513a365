"""pyeff: efficient deep learning methods whose savings show up as wall-clock time."""
__version__ = "0.1.0"

from pyeff import _extension  # noqa: F401  (loads pyeff._C and registers its ops)
from pyeff import ops  # noqa: F401,E402

__all__ = ["ops", "__version__"]
