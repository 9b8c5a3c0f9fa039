"""Adversarial methods, one per file, each registered under its lower-case name."""

from .awp import AWP
from .base import AdversarialMethod, AttackResult, get_method_class, list_methods, register_method
from .fgm import FGM
from .fgsm import FGSM
from .pgd import PGD
from .vat import VAT

__all__ = [
    "AWP",
    "FGM",
    "FGSM",
    "PGD",
    "VAT",
    "AdversarialMethod",
    "AttackResult",
    "get_method_class",
    "list_methods",
    "register_method",
]
