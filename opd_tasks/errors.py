"""Re-export of the error hierarchy, which lives in `storage.errors` (the lowest layer)."""

from storage.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    ModelError,
    OpdError,
    TrainingError,
    TransientError,
)

__all__ = ["ArtifactError", "ConfigError", "DataError", "ModelError", "OpdError", "TrainingError", "TransientError"]
