"""``dml``: Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, CVPR 2018), METHODS.md section 0.

``m`` peers learn together; each is trained with cross-entropy plus the mean KL divergence towards the
other peers' predictions (T = 1)::

    L_k = CE(z_k) + 1/(m-1) * sum_{j != k} KL_1(z_j -> z_k)

Every target ``z_j`` is detached, so ``KL(z_j -> z_k)`` trains peer ``k`` only. All peers are updated
together from one forward pass (the paper alternates the peers' updates within a step; one joint step
is what common re-implementations do and costs one forward instead of m).

Heads: ``peer1..peerm`` and ``ensemble`` (mean of the peers' logits). Deploy: the peer with the best
validation accuracy (decided at every evaluation, kept in the ``best_peer`` buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, MethodContext, register_method
from .losses import kl_div
from .peers import BestPeerDeployment, PeerNetworks, check_peer_count, resolve_peer_names


def mutual_kl(logits: Sequence[torch.Tensor], temperature: float = 1.0, standardize: bool = False
              ) -> torch.Tensor:
    """DML's peer term summed over the peers: ``sum_k 1/(m-1) sum_{j != k} KL_T(z_j -> z_k)``.

    Zhang et al., "Deep Mutual Learning", CVPR 2018, eq. (10) generalised to ``m`` peers.
    ``KL_T(t -> s) = T^2 KL(softmax(t/T) || softmax(s/T))``, batch mean, target detached.

    Args:
        logits: ``m >= 2`` tensors ``(B, K)``.
        temperature: ``T`` (1 in DML).
        standardize: logit standardization of every KL term (:func:`~.losses.standardize_logits`).
    Returns:
        A float32 scalar.
    """
    m = len(logits)
    if m < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {m}")
    total = sum(kl_div(logits[k], logits[j], temperature, standardize)
                for k in range(m) for j in range(m) if j != k)
    return total / (m - 1)


def dml_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float = 1.0,
             standardize: bool = False) -> dict[str, torch.Tensor]:
    """DML's loss of all peers as named terms: ``sum_k L_k`` with
    ``L_k = CE(z_k) + 1/(m-1) sum_{j != k} KL_T(z_j -> z_k)``.

    Args:
        logits: ``m`` tensors ``(B, K)``.
        labels: ``(B,)`` class indices.
        temperature: ``T``.
        standardize: logit standardization of the KL terms.
    Returns:
        ``{"loss_ce": sum_k CE(z_k), "loss_kl": mutual_kl(logits, T)}``.
    """
    return {
        "loss_ce": sum(F.cross_entropy(z.float(), labels) for z in logits),
        "loss_kl": mutual_kl(logits, temperature, standardize),
    }


@register_method("dml", "Deep Mutual Learning: m peers, each CE + mean KL towards the others")
class DML(BestPeerDeployment, Method):
    recipe_epochs = 200  #: the paper's CIFAR-100 schedule (T=1): 200 epochs, x0.1 every 60
    family = "online"
    accepts_models = True

    @dataclass
    class Options:
        """Options of ``dml``."""

        peers: int | None = None  #: number of peers, 2 to 16 (default 2, or the length of ``models``)
        temperature: float = 1.0  #: T of the peer KL terms (1 in the paper)
        batched_peers: bool = False  #: run same-architecture peers as one vmap-ed computation
        logit_std: bool = False  #: z-score the logits before the KL softmax (Sun et al. 2024)

        def validate(self) -> None:
            check_peer_count(self.peers, "peers")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be positive, got {self.temperature}")

    def __init__(self, ctx: MethodContext, options: Options | None = None) -> None:
        super().__init__(ctx, options)
        self.options.validate()
        self.peers = PeerNetworks(ctx, resolve_peer_names(ctx, self.options.peers),
                                  batched=self.options.batched_peers)
        self.heads = [f"peer{k + 1}" for k in range(self.peers.num_peers)]
        self.register_buffer("best_peer", torch.zeros((), dtype=torch.long))

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int
                      ) -> dict[str, torch.Tensor]:
        return dml_loss(self.peers(images).logits, labels, self.options.temperature,
                        self.options.logit_std)

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.peers(images).logits
        out = dict(zip(self.heads, logits))
        out["ensemble"] = torch.stack(logits).mean(dim=0)
        return out

    def summary_extras(self) -> dict[str, object]:
        return {"peers": self.peers.names, "deployed_peer": self.deploy_head}
