"""Data in: the CUB archive, synthetic sets in its layout, the prepared copy, datasets, transforms."""
