"""Model cache: on-demand fetch from the file service into a safe, bounded, shared cache."""

from gpud.modelstore.fetch import SHA256_HEADER
from gpud.modelstore.ids import validate_model_id
from gpud.modelstore.info import FetchPhase, FetchProgress, ModelInfo, VerifyResult
from gpud.modelstore.manifest import MANIFEST_NAME
from gpud.modelstore.store import ModelStore, ProgressCallback

__all__ = [
    "MANIFEST_NAME",
    "SHA256_HEADER",
    "FetchPhase",
    "FetchProgress",
    "ModelInfo",
    "ModelStore",
    "ProgressCallback",
    "VerifyResult",
    "validate_model_id",
]
