"""Data for demos, tests and benchmarks: anatomical phantoms with simulated lesions (no download)."""
from .synthetic import (LESION_FAMILIES, SyntheticSubject, load_template, make_abnormal, make_dataset,
                        make_normal, make_subject)

__all__ = ["LESION_FAMILIES", "SyntheticSubject", "load_template", "make_abnormal", "make_dataset", "make_normal",
           "make_subject"]
