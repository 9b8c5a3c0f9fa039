"""The classic adversarial-training snippets that users copy today, written from the published algorithms, for the
benchmarks to measure `hf_adv` against. Not part of the library and not to be used for training.

- `ClassicFGM`: the FGM class of Chinese NLP competition notebooks (after Miyato et al., ICLR 2017): clones the
  whole vocab x hidden embedding matrix, steps r = eps * g / ||g|| on its dense gradient.
- `ClassicPGD`: the matching PGD class (after Madry et al., ICLR 2018): backs up every parameter gradient before
  the K ascent steps, each a full forward and backward, and restores them before the last.
- `ClassicAWP`: the AWP class of Kaggle solutions (after Wu et al., NeurIPS 2020): adv_lr relative steps on every
  parameter whose name holds "weight", bounds w0 +- eps|w0| kept as two extra copies of the weights, gradients
  zeroed before the adversarial backward.
- `ClassicVAT`: VAT as in Miyato et al.'s reference code, in its common PyTorch port: clean prediction from a
  no-grad forward, one power iteration whose probe gradient comes from a full `backward()` (parameter gradients
  computed, then zeroed), perturbation added to the embedding output.
- `OneBackwardVAT`: VAT written the fast way, the bar `hf_adv`'s VAT is held to: clean prediction taken from the
  clean forward (no extra pass), the probe gradient from `torch.autograd.grad` with respect to the perturbation
  only (no parameter gradient), and the clean loss and the LDS back-propagated in ONE backward.

`ClassicTrainer` runs each of them inside `transformers.Trainer.training_step` the way users wire them in, so that
a benchmark compares training steps that differ only in the adversarial part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

CLASSIC_METHODS = ("fgm", "pgd", "awp", "vat", "vat_one_backward")


class ClassicFGM:
    """FGM as in the competition snippet: a full clone of the embedding matrix per step."""

    def __init__(self, model: nn.Module, epsilon: float = 1.0, emb_name: str = "word_embeddings"):
        self.model, self.epsilon, self.emb_name = model, epsilon, emb_name
        self.backup: dict[str, torch.Tensor] = {}

    def attack(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(self.epsilon * param.grad / norm)

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                param.data = self.backup[name]
        self.backup = {}


class ClassicPGD:
    """PGD as in the competition snippet: embedding clone, every gradient backed up, K full backward passes."""

    def __init__(
        self,
        model: nn.Module,
        epsilon: float = 1.0,
        alpha: float = 0.3,
        steps: int = 3,
        emb_name: str = "word_embeddings",
    ):
        self.model, self.epsilon, self.alpha, self.steps, self.emb_name = model, epsilon, alpha, steps, emb_name
        self.emb_backup: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}

    def attack(self, is_first_attack: bool = False) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(self.alpha * param.grad / norm)
                    param.data = self.project(name, param.data)

    def project(self, name: str, data: torch.Tensor) -> torch.Tensor:
        r = data - self.emb_backup[name]
        if torch.norm(r) > self.epsilon:
            r = self.epsilon * r / torch.norm(r)
        return self.emb_backup[name] + r

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def backup_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.grad_backup:
                param.grad = self.grad_backup[name]
        self.grad_backup = {}


class ClassicAWP:
    """AWP as in the Kaggle snippet: the weights plus their two bounds saved, gradients zeroed before the attack."""

    def __init__(self, model: nn.Module, adv_lr: float = 1.0, adv_eps: float = 1e-3, adv_param: str = "weight"):
        self.model, self.adv_lr, self.adv_eps, self.adv_param = model, adv_lr, adv_eps, adv_param
        self.backup: dict[str, torch.Tensor] = {}
        self.backup_eps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                    grad_eps = self.adv_eps * param.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)

    def attack_step(self) -> None:
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                norm1 = torch.norm(param.grad)
                norm2 = torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    r_at = self.adv_lr * param.grad / (norm1 + e) * (norm2 + e)
                    param.data.add_(r_at)
                    param.data = torch.min(torch.max(param.data, self.backup_eps[name][0]), self.backup_eps[name][1])

    def restore(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup, self.backup_eps = {}, {}


class ClassicVAT:
    """LDS as in Miyato et al.'s reference code (PyTorch port): probe gradient by a full backward, then zeroed."""

    def __init__(self, model: nn.Module, xi: float = 10.0, epsilon: float = 1.0, iterations: int = 1):
        self.model, self.xi, self.epsilon, self.iterations = model, xi, epsilon, iterations

    @staticmethod
    def _l2_normalize(d: torch.Tensor) -> torch.Tensor:
        return d / (d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1))) + 1e-8)

    def __call__(self, inputs: dict) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        embedding = self.model.get_input_embeddings()
        shift: dict[str, torch.Tensor | None] = {"delta": None}

        def add_delta(module, args, output):
            return output if shift["delta"] is None else output + shift["delta"]

        with torch.no_grad():
            pred = F.softmax(self.model(**inputs).logits, dim=1)
        handle = embedding.register_forward_hook(add_delta)
        try:
            shape = (*inputs["input_ids"].shape, embedding.weight.shape[-1])
            d = self._l2_normalize(torch.rand(shape, device=pred.device).sub(0.5))
            for _ in range(self.iterations):
                d.requires_grad_()
                shift["delta"] = self.xi * d
                logp_hat = F.log_softmax(self.model(**inputs).logits, dim=1)
                adv_distance = F.kl_div(logp_hat, pred, reduction="batchmean")
                adv_distance.backward()
                d = self._l2_normalize(d.grad)
                self.model.zero_grad()
            shift["delta"] = d * self.epsilon
            logp_hat = F.log_softmax(self.model(**inputs).logits, dim=1)
            return F.kl_div(logp_hat, pred, reduction="batchmean")
        finally:
            handle.remove()


class OneBackwardVAT(ClassicVAT):
    """Clean loss and LDS of one batch from three forwards and one backward (see the module docstring)."""

    def __call__(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.get_input_embeddings()
        shift: dict[str, torch.Tensor | None] = {"delta": None}

        def add_delta(module, args, output):
            return output if shift["delta"] is None else output + shift["delta"]

        handle = embedding.register_forward_hook(add_delta)
        try:
            outputs = self.model(**inputs)
            pred = F.softmax(outputs.logits.detach(), dim=1)
            features = {k: v for k, v in inputs.items() if k != "labels"}
            shape = (*inputs["input_ids"].shape, embedding.weight.shape[-1])
            d = self._l2_normalize(torch.randn(shape, device=pred.device))
            for _ in range(self.iterations):
                d = (self.xi * d).requires_grad_()
                shift["delta"] = d
                logp_hat = F.log_softmax(self.model(**features).logits, dim=1)
                (grad,) = torch.autograd.grad(F.kl_div(logp_hat, pred, reduction="batchmean"), d)
                d = self._l2_normalize(grad)
            shift["delta"] = d * self.epsilon
            logp_hat = F.log_softmax(self.model(**features).logits, dim=1)
            return outputs.loss, F.kl_div(logp_hat, pred, reduction="batchmean")
        finally:
            handle.remove()


class RepeatedPassTrainer(Trainer):
    """`Trainer` whose step runs the plain forward and backward `passes` times on the batch, gradients adding up.

    Not a method: the floor that any attack needing that many full passes cannot go below on the machine (it pays the
    second forward, the second backward and the accumulation into existing gradients, and nothing else).
    """

    def __init__(self, *args, passes: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = passes

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        for _ in range(self.passes):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            self.accelerator.backward(loss)
        return loss.detach()


class ClassicTrainer(Trainer):
    """`Trainer` whose training step runs one classic snippet, wired in as the snippets' READMEs show.

    Args:
        classic (`str`): `"fgm"`, `"pgd"`, `"awp"`, `"vat"` or `"vat_one_backward"`.
        epsilon, alpha, steps: FGM / PGD settings (PGD: K = `steps` adversarial forward+backward passes).
        awp_lr, awp_eps: AWP `adv_lr` and `adv_eps`.
        vat_weight, vat_xi, vat_epsilon, vat_iterations: VAT settings.
    """

    def __init__(
        self,
        *args,
        classic: str,
        epsilon: float = 1.0,
        alpha: float = 0.3,
        steps: int = 3,
        awp_lr: float = 1.0,
        awp_eps: float = 1e-3,
        vat_weight: float = 1.0,
        vat_xi: float = 10.0,
        vat_epsilon: float = 1.0,
        vat_iterations: int = 1,
        **kwargs,
    ):
        if classic not in CLASSIC_METHODS:
            raise ValueError(f"classic={classic!r} is not one of {CLASSIC_METHODS}.")
        super().__init__(*args, **kwargs)
        self.classic = classic
        self.steps, self.vat_weight = steps, vat_weight
        model = self.model
        self.snippet = {
            "fgm": lambda: ClassicFGM(model, epsilon=epsilon),
            "pgd": lambda: ClassicPGD(model, epsilon=epsilon, alpha=alpha, steps=steps),
            "awp": lambda: ClassicAWP(model, adv_lr=awp_lr, adv_eps=awp_eps),
            "vat": lambda: ClassicVAT(model, xi=vat_xi, epsilon=vat_epsilon, iterations=vat_iterations),
            "vat_one_backward": lambda: OneBackwardVAT(
                model, xi=vat_xi, epsilon=vat_epsilon, iterations=vat_iterations
            ),
        }[classic]()

    def _loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        backward = self.accelerator.backward
        snippet = self.snippet
        if self.classic == "vat_one_backward":
            loss, lds = snippet(inputs)
            backward(loss + self.vat_weight * lds)
            return loss.detach()
        if self.classic == "vat":
            # The port computes LDS first (its probe backward ends in zero_grad), then backs up the sum.
            lds = snippet(inputs)
            loss = self._loss(model, inputs)
            backward(loss + self.vat_weight * lds)
            return loss.detach()

        loss = self._loss(model, inputs)
        backward(loss)
        if self.classic == "fgm":
            snippet.attack()
            backward(self._loss(model, inputs))
            snippet.restore()
        elif self.classic == "pgd":
            snippet.backup_grad()
            for t in range(self.steps):
                snippet.attack(is_first_attack=t == 0)
                if t != self.steps - 1:
                    model.zero_grad()
                else:
                    snippet.restore_grad()
                backward(self._loss(model, inputs))
            snippet.restore()
        elif self.classic == "awp":
            snippet.save()
            snippet.attack_step()
            model.zero_grad()  # the snippet calls optimizer.zero_grad() here
            backward(self._loss(model, inputs))
            snippet.restore()
        return loss.detach()
