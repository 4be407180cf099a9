"""The peer networks of the online methods (``dml``, ``one``, ``ffl``, ``ffl_s``, ``mfef``).

:class:`PeerNetworks` holds ``m`` networks trained side by side, in one of two layouts:

* **independent**: ``m`` zoo backbones, possibly of different architectures (``ctx.models``);
* **shared trunk**: the stem and every stage but the last of one backbone are shared, and ``m`` branches
  (the last stage + the classifier head, a :class:`~fusionkd.models.Tail`) grow on it (ONE, FFL-S).

and runs them in one of two ways:

* **sequential** (default): one peer after another;
* **batched** (``batched_peers=true``): peers of one architecture run as one computation,
  ``torch.func.vmap`` over their stacked parameters and buffers (convolutions become grouped
  convolutions; they compute in float32, as autocast does not apply inside ``vmap``). BatchNorm running
  statistics are passed to ``functional_call`` as stacked buffers, updated in place under ``vmap`` and
  copied back to each peer, so both ways give the same logits, gradients and statistics (tested). On CPU
  the sequential way is faster (``benchmarks/online_peers.py``, numbers in ``docs/methods/online.md``),
  hence the default; heterogeneous peers always run sequentially.

Every online method trains between :data:`MIN_PEERS` and :data:`MAX_PEERS` networks (``options.peers`` of
``dml``/``ffl``, ``options.branches`` of ``one``/``ffl_s``, ``options.students`` of ``mfef``, or the length of
``models=[...]``); :func:`check_peer_count` refuses other counts with the accepted range.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..models import Backbone, is_staged
from .base import MethodContext

#: fewest networks an online method trains side by side (mutual learning needs two)
MIN_PEERS = 2
#: most networks an online method trains side by side. The papers use 2 to 5; every one more adds a whole
#: network's parameters, memory and time (1000 resnet20-sized peers would be 277 M extra parameters)
MAX_PEERS = 16


def check_peer_count(value: int | None, option: str = "peers") -> None:
    """Refuse a peer count (``options.<option>``) outside ``[MIN_PEERS, MAX_PEERS]``; None (the default
    count) passes.

    Raises:
        ValueError: naming the option, the value and the accepted range.
    """
    if value is None:
        return
    accepted = f"accepted: {MIN_PEERS} to {MAX_PEERS} networks trained side by side"
    if value < MIN_PEERS:
        raise ValueError(f"{option} must be at least {MIN_PEERS}, got {value} ({accepted})")
    if value > MAX_PEERS:
        raise ValueError(f"{option} must be at most {MAX_PEERS}, got {value} ({accepted}; each one more adds a "
                         "whole network's parameters, memory and time)")


def resolve_peer_names(ctx: MethodContext, count: int | None, option: str = "peers") -> list[str]:
    """Zoo names of the peers: ``ctx.models`` when given, else ``count`` (default 2) copies of ``ctx.model``.

    Raises:
        ValueError: fewer than :data:`MIN_PEERS` or more than :data:`MAX_PEERS` peers, or ``count`` disagrees
            with ``len(ctx.models)``.
    """
    check_peer_count(count, f"options.{option}")
    if ctx.models:
        if count is not None and count != len(ctx.models):
            raise ValueError(
                f"options.{option}={count} disagrees with the {len(ctx.models)} networks given in models="
                f"{ctx.models}; drop options.{option} (the number of networks follows models) or list "
                f"{count} models"
            )
        names = list(ctx.models)
    else:
        names = [ctx.model] * (2 if count is None else count)
    if len(names) < MIN_PEERS:
        raise ValueError(f"online distillation needs at least {MIN_PEERS} networks, got {len(names)} ({names})")
    if len(names) > MAX_PEERS:
        raise ValueError(f"online distillation trains at most {MAX_PEERS} networks, got {len(names)} in models= "
                         f"(accepted: {MIN_PEERS} to {MAX_PEERS})")
    return names


def best_index(val_accuracy: dict[str, float], heads: Sequence[str]) -> int | None:
    """Index of the head in ``heads`` with the highest validation accuracy (the first one on ties);
    ``None`` when one of them was not evaluated (e.g. no validation split)."""
    if not heads or any(h not in val_accuracy for h in heads):
        return None
    accs = [val_accuracy[h] for h in heads]
    return accs.index(max(accs))


class BestPeerDeployment:
    """Deploy the peer with the best validation accuracy (DML, ONE, FFL, FFL-S, MFEF).

    Decided at every evaluation and kept in the ``best_peer`` buffer, so it is checkpointed. The host
    method defines ``heads`` (one head name per peer, in peer order), ``peers`` (a :class:`PeerNetworks`)
    and registers the ``best_peer`` buffer; list this class before :class:`Method` among the bases.
    """

    heads: list[str]
    peers: PeerNetworks
    best_peer: torch.Tensor

    def on_validation(self, val_accuracy: dict[str, float]) -> None:
        best = best_index(val_accuracy, self.heads)
        if best is not None:
            self.best_peer.fill_(best)

    @property
    def deploy_head(self) -> str:
        return self.heads[int(self.best_peer)]

    @property
    def deploy_model_name(self) -> str:
        return self.peers.names[int(self.best_peer)]

    def deploy_model(self) -> nn.Module:
        return self.peers.deploy(int(self.best_peer))


@dataclass
class PeerOutputs:
    """What :meth:`PeerNetworks.forward` returns, one entry per peer.

    Attributes:
        maps: last stage map of each peer, ``(B, C_k, H_k, W_k)``.
        logits: each peer's classifier output, ``(B, K)``.
        processed: ``post[k](maps[k])`` when post-processing modules were passed, else ``maps``.
        shared: the trunk's output map ``(B, C, H, W)`` (shared-trunk layout), else ``None``.
    """

    maps: list[torch.Tensor]
    logits: list[torch.Tensor]
    processed: list[torch.Tensor]
    shared: torch.Tensor | None


class PeerUnit(nn.Module):
    """One peer as a single callable: ``x -> (last map, logits, post(last map))``.

    Args:
        net: a zoo backbone (input: images) or a :class:`Tail` (input: the trunk's map).
        post: optional module applied to the last map (e.g. MFEF's multi-scale + attention block);
            ``None`` returns the map itself.
    """

    def __init__(self, net: nn.Module, post: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.post = post

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last = self.net.forward_stages(x)[-1]
        logits = self.net.forward_head(last)
        return last, logits, (self.post(last) if self.post is not None else last)


def run_stacked(units: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run ``m`` modules of one architecture on the same input as one ``vmap``-ed computation.

    Parameters and buffers are stacked along a new leading dimension (``torch.stack`` is differentiable,
    so gradients reach each module's own parameters), the first module is called functionally on each
    slice, and in training mode the BatchNorm statistics updated in place on the stacked buffers are
    copied back to every module.

    Args:
        units: modules with identical parameter and buffer names and shapes.
        x: the shared input ``(B, ...)``.
    Returns:
        The template's outputs, each stacked: ``(m, *output_shape)``.
    """
    template = units[0]
    amp_off = contextlib.nullcontext()
    if torch.is_autocast_enabled(x.device.type):
        # autocast does not reach inside torch.func.vmap (torch 2.13: a bf16 input then meets fp32 weights
        # and fails), so the batched peers compute in float32
        warnings.warn("batched_peers: the peers run in float32 inside vmap (autocast does not apply there); "
                      "use batched_peers=false for low-precision peers", stacklevel=2)
        amp_off = torch.autocast(x.device.type, enabled=False)
        x = x.float()
    param_sets = [dict(u.named_parameters()) for u in units]
    buffer_sets = [dict(u.named_buffers()) for u in units]
    params = {n: torch.stack([ps[n] for ps in param_sets]) for n in param_sets[0]}
    buffers = {n: torch.stack([bs[n] for bs in buffer_sets]) for n in buffer_sets[0]}

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], inp: torch.Tensor):
        return functional_call(template, (p, b), (inp,))

    with amp_off:
        out = vmap(call, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
    if template.training and buffers:
        with torch.no_grad():
            for k, bs in enumerate(buffer_sets):
                for n, buf in bs.items():
                    buf.copy_(buffers[n][k])
    return out


class PeerNetworks(nn.Module):
    """``m`` peer networks (independent or on a shared trunk), run sequentially or batched.

    Args:
        ctx: the method context (creates the networks; ``image_size``/``in_chans`` for shape checks).
        names: zoo name of each peer (one name repeated for a shared trunk).
        shared_trunk: share the stem and all stages but the last; each peer is then a branch made of
            the last stage and the head.
        batched: run peers of one architecture as one ``vmap``-ed computation.

    Every peer is created by its own ``ctx.create(name)`` call, so branches start from independent
    random initialisations (deep copies of one tail would start, and stay, identical).

    Attributes:
        trunk: the shared :class:`~fusionkd.models.Trunk`, or ``None`` for independent peers.
        members: ``nn.ModuleList`` of the ``m`` backbones (independent) or tails (shared trunk).
    """

    def __init__(self, ctx: MethodContext, names: Sequence[str], shared_trunk: bool = False,
                 batched: bool = False) -> None:
        super().__init__()
        self.names = list(names)
        self.ctx = ctx
        self.batched = batched
        self.uniform = len(set(self.names)) == 1
        backbones = [ctx.create(n) for n in self.names]
        for name, net in zip(self.names, backbones):
            if not is_staged(net):
                raise ValueError(f"{name!r} is not on the stage contract; online methods need a zoo backbone or "
                                 "a module adapted with fusionkd.models.HookBackbone")
            if shared_trunk and not isinstance(net, Backbone):
                raise ValueError(
                    f"{name!r} ({type(net).__name__}) is an adapted user module; a shared trunk with copied "
                    "last-stage branches (ffl_s, one) needs a zoo Backbone that can be split into trunk and tail "
                    "(hooks see a module's stage outputs, not the code between them). Use ffl (independent "
                    "sub-networks), dml or mfef with this module, or a zoo model / Backbone subclass")
        if shared_trunk:
            if not self.uniform:
                raise ValueError(
                    f"a shared trunk needs one architecture for every branch, got {self.names}; use "
                    "independent networks for heterogeneous peers"
                )
            self.split_at = backbones[0].num_stages - 1
            self.trunk = backbones[0].split(self.split_at)[0]
            self.members = nn.ModuleList(b.split(self.split_at)[1] for b in backbones)
        else:
            self.split_at = 0
            self.trunk = None
            self.members = nn.ModuleList(backbones)

    @property
    def num_peers(self) -> int:
        return len(self.members)

    @property
    def last_channels(self) -> list[int]:
        """Channels ``C_k`` of each peer's last map."""
        return [m.stage_info[-1].channels for m in self.members]

    def forward(self, x: torch.Tensor, post: Sequence[nn.Module] | None = None) -> PeerOutputs:
        """Images ``(B, C, H, W)`` -> every peer's last map and logits (and ``post[k]`` of its map)."""
        shared = self.trunk(x) if self.trunk is not None else None
        inp = shared if shared is not None else x
        units = [PeerUnit(net, post[k] if post is not None else None) for k, net in enumerate(self.members)]
        if self.batched and self.uniform:
            last, logits, processed = (list(t.unbind(0)) for t in run_stacked(units, inp))
        else:
            outs = [u(inp) for u in units]
            last, logits, processed = (list(t) for t in zip(*outs))
        return PeerOutputs(maps=last, logits=logits, processed=processed, shared=shared)

    def last_map_shapes(self) -> list[tuple[int, int, int]]:
        """``(C, H, W)`` of each peer's last map for this run's input size (a dry run in eval mode)."""
        ref = next(self.parameters())
        x = torch.zeros(1, self.ctx.in_chans, self.ctx.image_size, self.ctx.image_size,
                        device=ref.device, dtype=ref.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                maps = self.forward(x).maps
        finally:
            self.train(was_training)
        return [tuple(int(s) for s in m.shape[1:]) for m in maps]

    def require_same_map_size(self, method: str) -> None:
        """Raise a ``ValueError`` naming every peer's last-map size and stride when they differ."""
        shapes = self.last_map_shapes()
        if len({s[1:] for s in shapes}) == 1:
            return
        size = self.ctx.image_size
        parts = [
            f"{n} gives {c}x{h}x{w} (stride {m.stage_info[-1].stride})"
            for n, m, (c, h, w) in zip(self.names, self.members, shapes)
        ]
        raise ValueError(
            f"{method} fuses the last feature maps of its networks, so they must share H x W; at "
            f"{size}x{size} input " + ", ".join(parts) + ". Choose networks whose last stages have the "
            "same stride (e.g. resnet32 + wrn_16_2, both stride 4)"
        )

    def deploy(self, k: int) -> nn.Module:
        """Peer ``k`` as a plain zoo backbone of type ``names[k]``.

        Independent peers are returned as they are (sharing weights with the method). A branch is
        assembled into a fresh ``ctx.create(name)``: trunk keys ``stem.*`` and ``stages.0..s-1.*`` are
        kept, tail keys ``stages.j.*`` become ``stages.{s+j}.*``, ``head.*`` is kept.
        """
        member = self.members[k]
        if self.trunk is None:
            return member
        net = self.ctx.create(self.names[k], pretrained=False)
        state = dict(self.trunk.state_dict())
        for key, value in member.state_dict().items():
            if key.startswith("stages."):
                j, rest = key[len("stages."):].split(".", 1)
                key = f"stages.{int(j) + self.split_at}.{rest}"
            state[key] = value
        net.load_state_dict(state)
        ref = next(self.trunk.parameters())
        return net.to(device=ref.device).train(self.training)

