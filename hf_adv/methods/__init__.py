"""Methods, one per file, each registered under its lower-case name: perturbations (`adv_method`) and
regularizers (enabled by their weight flag). See `base.py` for the interface."""

from .awp import AWP
from .base import (
    AdversarialMethod,
    AttackResult,
    Method,
    Regularizer,
    get_method_class,
    list_methods,
    register_method,
)
from .carry import CarriedFGM
from .fgm import FGM
from .fgsm import FGSM
from .freelb import FreeLB
from .pgd import PGD
from .rdrop import RDrop
from .vat import VAT

__all__ = [
    "AWP",
    "FGM",
    "FGSM",
    "PGD",
    "VAT",
    "AdversarialMethod",
    "AttackResult",
    "CarriedFGM",
    "FreeLB",
    "Method",
    "RDrop",
    "Regularizer",
    "get_method_class",
    "list_methods",
    "register_method",
]
