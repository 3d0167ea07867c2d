"""Deployment, torch-free except ``export``: preprocessing, the ONNX embedder, exact neighbours, gallery indexes, the cached gallery, the web server; ``export`` (torch) writes the model."""
