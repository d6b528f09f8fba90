"""Re-exports of leanlm.calibration for code that imported pruning's calibration helpers from here."""

from ..calibration import BlockRunner, block_linears, calibration_tokens, capture_inputs, row_parts  # noqa: F401
