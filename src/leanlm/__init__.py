"""leanlm: make a transformer language model cheaper per token, and prove it by measurement."""

from .errors import LeanlmError
from . import calibration
from .apply import apply
from .model import load, save

__version__ = "0.1.0"
__all__ = ["LeanlmError", "apply", "calibration", "load", "save", "__version__"]
