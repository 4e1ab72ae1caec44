"""lssf_lightning: Low-Rank Safety Subspace Fusion for PyTorch Lightning."""
