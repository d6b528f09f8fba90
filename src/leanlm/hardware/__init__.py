"""Hardware profiles and the roofline cost model of the runtime."""

from .cost import Plan, estimate, forward_cost
from .profiles import BUILTIN, HardwareProfile, load_profile, save_profile

__all__ = ["BUILTIN", "HardwareProfile", "Plan", "estimate", "forward_cost", "load_profile", "save_profile"]
