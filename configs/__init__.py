"""Named presets: real model shapes and serving settings, as frozen dataclass instances."""

from configs.models import MODEL_PRESETS, get_model_preset

__all__ = ["MODEL_PRESETS", "get_model_preset"]
