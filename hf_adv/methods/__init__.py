"""Methods, one per file, each registered under its lower-case name: perturbations (`adv_method`) and
regularizers (enabled by their weight flag). See `base.py` for the interface.

Every module of this package is imported here, so a new file with a `@register_method` class is a new method: the
arguments, the trainer, the recipes, the tests and the benchmarks find it in the registry.
"""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

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
