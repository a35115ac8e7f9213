"""adaloc: adaptable model usage control (AdaLoc access keys, M-LOCK tokens), pure PyTorch.

Importing this package does no work and pulls in no MLOps package; see ``adaloc.keys``,
``adaloc.lock``, ``adaloc.training``, ``adaloc.artifact``, ``adaloc.data``, ``adaloc.models``.
"""

__version__ = "0.1.0"
