"""triplet: triplet-loss metric learning on CUB-200-2011 in plain PyTorch."""

__version__ = "0.1.0"
