"""hf_adv: adversarial training (FGM, FGSM, PGD, AWP, FreeLB, VAT, R-Drop) for Hugging Face `transformers.Trainer`."""

from .arguments import AdversarialTrainingArguments
from .embedding import EmbeddingTap, find_input_embedding
from .methods import (
    AWP,
    FGM,
    FGSM,
    PGD,
    VAT,
    AdversarialMethod,
    AttackResult,
    CarriedFGM,
    FreeLB,
    Method,
    RDrop,
    Regularizer,
    list_methods,
    register_method,
)
from .trainer import AdversarialMixin, AdversarialTrainer

__version__ = "0.1.0"

__all__ = [
    "AWP",
    "FGM",
    "FGSM",
    "PGD",
    "VAT",
    "AdversarialMethod",
    "CarriedFGM",
    "FreeLB",
    "Method",
    "RDrop",
    "Regularizer",
    "AdversarialMixin",
    "AdversarialTrainer",
    "AdversarialTrainingArguments",
    "AttackResult",
    "EmbeddingTap",
    "find_input_embedding",
    "list_methods",
    "register_method",
]
