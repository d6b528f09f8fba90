"""Weight quantization: RTN, GPTQ and AWQ to int8 / int4, packed storage and CPU kernels.

    import leanlm
    from leanlm.quant import GPTQ, quantize, calibration_tokens, save_quantized

    model, tok = leanlm.load("smollm2-135m")                       # float32 for calibration
    calib = calibration_tokens(tok, "wikitext2-valid", n_samples=32, seq_len=512)
    quantize(model, GPTQ(bits=4, group=128), calib)                # in place; bf16 compute
    save_quantized(model, tok, "out/smollm2-gptq4")                # leanlm.load(dir) reloads it

Layout: config.py (configs, QSpec), rtn.py (the grid, round-to-nearest), codebook.py (4- and 3-bit table grids
and CodebookLinear), gptq.py, awq.py,
calibrate.py (GPTQ's true-sequential walk; data, driver and hooks are leanlm/calibration.py), mixed.py (per-layer
sensitivity and bit assignment), packed.py (QuantLinear / QuantEmbedding and kernels),
save.py (on-disk layout), pipeline.py (quantize), cli.py (`leanlm quantize`).
"""

from ..calibration import calibration_tokens
from .calibrate import read_calibration
from .codebook import CodebookLinear
from .config import AWQ, GPTQ, RTN, MixedPrecision, QSpec, QuantConfig, make_config
from .nm import NMInt8, NMInt8Linear
from .packed import QuantEmbedding, QuantLinear, pack_int4, unpack_int4
from .pipeline import quantize
from .rtn import QuantizedWeight, rtn
from .save import is_quantized_dir, load_quantized, save_quantized

__all__ = ["AWQ", "CodebookLinear", "GPTQ", "RTN", "MixedPrecision", "NMInt8", "NMInt8Linear", "QSpec", "QuantConfig", "QuantEmbedding", "QuantLinear",
           "QuantizedWeight", "calibration_tokens", "is_quantized_dir", "load_quantized", "make_config", "pack_int4",
           "quantize", "read_calibration", "rtn", "save_quantized", "unpack_int4"]  # fmt: skip
