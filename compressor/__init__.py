"""checkpoint-compressor: distributed quantization and pruning of safetensors checkpoints."""

__version__ = "0.1.0"

__all__ = ["__version__"]
