"""A quantize job's configuration: the option table (`options`), the enums (`enums`) and the frozen, validated
dataclasses built from it (`job`). The names below are this package's public face."""

from wq_ops.config.enums import (
                                 AwqLoss,
                                 Backend,
                                 Format,
                                 Method,
                                 Modeling,
                                 MoeCalibration,
                                 Propagation,
                                 Runtime,
                                 Scheme,
                                 SpanMode,
                                 TextJoin,
                                 TpPolicy,
                                 parse_enum,
                                 positive_int,
)
from wq_ops.config.job import (
                                 BUNDLED_CALIB,
                                 AWQParams,
                                 CalibConfig,
                                 EvalConfig,
                                 GPTQParams,
                                 JobConfig,
                                 MoeParams,
                                 QuantConfig,
                                 RunConfig,
                                 missing_calibration,
)
from wq_ops.config.options import OPTIONS

__all__ = ["Method", "Format", "Backend", "Propagation", "Modeling", "AwqLoss", "SpanMode", "TpPolicy", "Runtime",
           "Scheme", "TextJoin", "MoeCalibration", "QuantConfig", "GPTQParams", "AWQParams", "MoeParams", "CalibConfig",
           "EvalConfig", "RunConfig", "JobConfig", "OPTIONS", "parse_enum", "positive_int", "BUNDLED_CALIB",
           "missing_calibration"]
