"""``one``: On-the-fly Native Ensemble (Lan, Zhu, Gong, NeurIPS 2018), METHODS.md section 0.

The stem and every stage but the last are shared; ``m`` branches (the last stage + GAP -> FC, each
initialised independently) grow on the shared map ``S``. A gate weights the branches::

    g = softmax(ReLU(BN(FC(GAP(S)))))          (B, m)
    z_t = sum_k g_k z_k                        the on-the-fly teacher (gated ensemble)
    L = sum_k CE(z_k) + CE(z_t) + w(t) sum_k KL_3(z_t -> z_k)

``z_t`` is detached as the KL target, so the KL terms train the branches (and the trunk under them)
but never the gate; ``CE(z_t)`` trains the gate, the branches and the trunk. ``w(t) = 1`` as in
METHODS.md; ``rampup_epochs > 0`` applies the sigmoid ramp-up of ONE's released code.

Heads: ``branch1..branchm`` and ``gate`` (the teacher). Deploy: trunk + the branch with the best
validation accuracy, assembled into a plain zoo backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, MethodContext, register_method
from .losses import kl_div, sigmoid_rampup
from .peers import BestPeerDeployment, PeerNetworks, check_peer_count


class BranchGate(nn.Module):
    """ONE's gate: shared map ``(B, C, H, W)`` -> branch weights ``(B, m)`` (rows sum to 1).

    ``g = softmax(ReLU(BN1d(FC(GAP(S)))))`` (Lan et al., NeurIPS 2018, Sec. 3; released code).

    Args:
        in_channels: ``C`` of the shared map.
        branches: ``m``.
    """

    def __init__(self, in_channels: int, branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(shared, 1), 1)
        return F.softmax(F.relu(self.bn(self.fc(pooled))).float(), dim=1)


def gated_logits(branch_logits: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """The teacher ``z_t = sum_k g_k z_k``: ``m`` logits ``(B, K)`` and gate ``(B, m)`` -> ``(B, K)``."""
    stacked = torch.stack([z.float() for z in branch_logits], dim=1)  # (B, m, K)
    return (gate.float().unsqueeze(2) * stacked).sum(dim=1)


def one_loss(branch_logits: Sequence[torch.Tensor], teacher_logits: torch.Tensor, labels: torch.Tensor,
             weight: float = 1.0, temperature: float = 3.0, standardize: bool = False
             ) -> dict[str, torch.Tensor]:
    """ONE's loss as named terms: ``sum_k CE(z_k) + CE(z_t) + w sum_k KL_T(z_t -> z_k)``.

    Lan et al., "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018, eq. (5).
    ``KL_T(t -> s) = T^2 KL(softmax(t/T) || softmax(s/T))``, batch mean, the teacher ``z_t`` detached.

    Args:
        branch_logits: ``m`` tensors ``(B, K)``.
        teacher_logits: ``z_t`` ``(B, K)``.
        labels: ``(B,)``.
        weight: ``w(t)``.
        temperature: ``T``.
        standardize: logit standardization of the KL terms (:func:`~.losses.standardize_logits`).
    Returns:
        ``{"loss_ce": sum_k CE(z_k), "loss_ce_gate": CE(z_t), "loss_kd": w sum_k KL_T(z_t -> z_k)}``.
    """
    return {
        "loss_ce": sum(F.cross_entropy(z.float(), labels) for z in branch_logits),
        "loss_ce_gate": F.cross_entropy(teacher_logits.float(), labels),
        "loss_kd": weight * sum(kl_div(z, teacher_logits, temperature, standardize) for z in branch_logits),
    }


@register_method("one", "On-the-fly Native Ensemble: shared trunk, m branches taught by their gated ensemble")
class ONE(BestPeerDeployment, Method):
    recipe_epochs = 300  #: the paper's CIFAR schedule (T=3): 300 epochs, x0.1 at 150 and 225
    family = "online"

    @dataclass
    class Options:
        """Options of ``one``."""

        branches: int = 3  #: number of branches m, 2 to 16 (3 in the paper's CIFAR experiments)
        temperature: float = 3.0  #: T of the KL terms
        rampup_epochs: float = 0.0  #: R of a sigmoid ramp-up of the KL weight (0: none, as in METHODS.md)
        batched_peers: bool = False  #: run the branches as one vmap-ed computation
        logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)

        def validate(self) -> None:
            check_peer_count(self.branches, "branches")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be positive, got {self.temperature}")
            if self.rampup_epochs < 0:
                raise ValueError(f"rampup_epochs must not be negative, got {self.rampup_epochs}")

    def __init__(self, ctx: MethodContext, options: Options | None = None) -> None:
        super().__init__(ctx, options)
        self.options.validate()
        names = [ctx.model] * self.options.branches
        self.peers = PeerNetworks(ctx, names, shared_trunk=True, batched=self.options.batched_peers)
        self.gate = BranchGate(self.peers.trunk.stage_info[-1].channels, self.options.branches)
        self.heads = [f"branch{k + 1}" for k in range(self.options.branches)]
        self.register_buffer("best_peer", torch.zeros((), dtype=torch.long))

    def _forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.peers(images)
        return out.logits, gated_logits(out.logits, self.gate(out.shared))

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int
                      ) -> dict[str, torch.Tensor]:
        branch_logits, teacher = self._forward(images)
        weight = sigmoid_rampup(epoch, self.options.rampup_epochs)
        return one_loss(branch_logits, teacher, labels, weight, self.options.temperature,
                        self.options.logit_std)

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        branch_logits, teacher = self._forward(images)
        return {**dict(zip(self.heads, branch_logits)), "gate": teacher}

    def summary_extras(self) -> dict[str, object]:
        return {"branches": self.options.branches, "deployed_branch": self.deploy_head}
