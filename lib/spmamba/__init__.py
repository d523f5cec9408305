"""SP-Mamba: unsupervised anomaly detection in medical images (library)."""
__version__ = "0.1.0"
