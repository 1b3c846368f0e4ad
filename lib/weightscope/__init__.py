"""weightscope: reading sparse-autoencoder features from model weights alone.

The thin library behind the weightscope book: loading models and SAEs, streaming metric kernels, result tables.
"""

__version__ = "0.1.0"
