"""Deployment: torch-free preprocessing, nearest neighbours and the ONNX embedder; ``export`` (torch) writes the model."""
