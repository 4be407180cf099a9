"""Adapt any ``nn.Module`` to the backbone contract with forward hooks: :class:`HookBackbone`.

.. code-block:: python

    net = HookBackbone(my_net, stage_names=["layer1", "layer2", "layer3"], head_name="fc",
                       input_shape=(3, 32, 32))
    maps = net.forward_stages(x)            # outputs of my_net.layer1/2/3, captured by hooks
    logits = net.forward_head(maps[-1])     # my_net.fc(GAP(maps[-1]))
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import UnknownNameError
from .base import StageInfo

#: ``tail(module, last_map) -> vector``: what a wrapped network runs between its last stage and its
#: classifier (pooling, a norm ...), for :class:`HookBackbone`'s ``tail`` argument
Tail = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class _StagesCaptured(Exception):
    """Raised by the last stage hook to skip the rest of the wrapped forward (never escapes)."""


class HookHead(nn.Module):
    """A view of an adapted module's head with :class:`ClassifierHead`'s interface.

    ``pooled(map)`` is the vector the head sees (GAP + flatten of the map when ``pool``, else the map
    itself) and ``forward(map) = head(pooled(map))``. It holds a reference to the wrapped head module, so
    it shares its parameters.
    """

    def __init__(self, head: nn.Module, pool: bool, num_features: int, tail: Tail | None = None,
                 module: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = head
        self.pool = pool
        self.num_features = num_features
        self.tail = tail
        self.__dict__["module"] = module  # a reference (the tail's argument), not a second registration
        self.pre_activates = False
        if tail is None:  # ClassifierHead's other two parts, as the self methods use them: nothing
            self.pre = nn.Identity()
            self.dropout = nn.Identity()

    def __getattr__(self, name: str) -> Any:
        if name in ("pre", "dropout") and self.__dict__.get("tail") is not None:
            raise ValueError(f"{type(self.__dict__['module']).__name__}'s head is its own tail ({self.tail.__name__}: "
                             "layers between its last stage and its classifier), not 'pre -> global pooling -> fc': "
                             "a method that rebuilds the head from those parts (byot) cannot use this network; "
                             "the other methods can")
        return super().__getattr__(name)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C)`` when pooling (the wrapped module's own tail where it has one), else
        ``x`` unchanged."""
        if self.tail is not None:
            return self.tail(self.__dict__["module"], x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) if self.pool else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


class HookBackbone(nn.Module):
    """Any ``nn.Module`` seen through the backbone contract, without changing its code or weights.

    Args:
        module: the network; ``forward(x)`` is ``module(x)``.
        stage_names: dotted paths (as in ``module.named_modules()``) of the submodules whose outputs
            are the stage maps, in order, e.g. ``["layer1", "layer2", "layer3"]``. Each must return
            a 4-D ``(B, C, H, W)`` tensor and run once per forward.
        head_name: dotted path of the classifier module (e.g. ``"fc"``).
        input_shape: ``(C, H, W)`` of one input; a dry run on an input of this shape (eval mode, no
            gradients, train/eval flags restored afterwards) gives ``stage_info``. Use a size that
            the network's total stride divides (e.g. 32x32) for exact strides.
        pool: whether ``forward_head`` applies global average pooling + flatten before the head
            (``True`` for the usual ``... -> GAP -> fc`` networks); with ``False`` the head gets the
            map itself.
        tail: for a network whose forward runs more than pooling between its last stage and its classifier
            (ConvNeXt's head norm, DenseNet's final ReLU, VGG's first two fully connected layers):
            ``tail(module, last_map) -> vector`` entering ``head_name``, replacing the pooling. A module-level
            function (it is called with the wrapped module, so copies of the backbone stay independent).
            The self methods that rebuild the head from ``pre -> pooling -> fc`` (byot) refuse such a network.
        stage_format: ``"NCHW"``, or ``"NHWC"`` for networks whose stages output channels-last tensors
            (torchvision's Swin): the maps are then offered permuted to ``(B, C, H, W)``; a ``tail`` gets
            them so too.

    ``forward_head(forward_stages(x)[-1]) == forward(x)`` holds when the wrapped forward is
    ``... -> last stage -> [GAP + flatten] -> head``; a warning is issued at construction when the dry
    run shows otherwise (e.g. layers between the last stage and the head), since fusion methods call
    ``forward_head`` on fused maps. Adapted modules cannot be :meth:`split`.
    """

    def __init__(
        self,
        module: nn.Module,
        stage_names: Sequence[str],
        head_name: str,
        input_shape: Sequence[int] = (3, 32, 32),
        pool: bool = True,
        tail: Tail | None = None,
        stage_format: str = "NCHW",
    ) -> None:
        super().__init__()
        if stage_format not in ("NCHW", "NHWC"):
            raise ValueError(f"stage_format must be 'NCHW' or 'NHWC', got {stage_format!r}")
        if isinstance(stage_names, str):
            raise TypeError("stage_names must be a list of module names, not a single string")
        if not stage_names:
            raise ValueError("at least one stage name is needed")
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"stage names must be distinct, got {list(stage_names)}")
        if head_name in stage_names:
            raise ValueError(f"the head {head_name!r} cannot also be a stage")
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        self.module = module
        self.stage_names = list(stage_names)
        self.head_name = head_name
        self.pool = pool
        self.tail = tail
        self.stage_format = stage_format
        self.input_shape = tuple(int(s) for s in input_shape)
        self.in_chans = self.input_shape[0]
        for name in [*self.stage_names, head_name]:
            self._submodule(name)
        head = self._submodule(head_name)
        self.stage_info: list[StageInfo] = []
        self.num_classes: int = head.out_features if isinstance(head, nn.Linear) else 0
        self._num_features: int = head.in_features if isinstance(head, nn.Linear) else 0
        self._dry_run()

    # ----------------------------------------------------------------- contract
    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    @property
    def num_features(self) -> int:
        """Width of the vector entering the head: the head's ``in_features`` for a linear head,
        else the last stage's channels."""
        return self._num_features

    @property
    def classifier_key(self) -> str:
        """State-dict prefix of the head (``module.<head_name>``), for weights files."""
        return f"module.{self.head_name}"

    @property
    def head(self) -> HookHead:
        """The head seen as a :class:`~fusionkd.models.base.ClassifierHead` (``pooled``, ``fc``)."""
        return HookHead(self._submodule(self.head_name), self.pool, self.num_features, self.tail, self.module)

    def forward(self, x: torch.Tensor) -> Any:
        """``module(x)``, unchanged."""
        return self.module(x)

    def forward_stages(self, x: torch.Tensor, raw: bool = False) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> the stage maps ``(B, C_i, H_i, W_i)``, captured by hooks while the wrapped
        module runs; the part of its forward after the last stage is skipped. The hooked modules' outputs
        are offered as they are (``raw`` changes nothing): to follow the backbone contract's rule
        (:mod:`fusionkd.models.base`) name modules whose output is what the next weight layer reads (e.g. a
        ReLU, not a residual sum that the next block normalises first)."""
        maps, _ = self._capture(x, stop_early=True)
        return maps

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage map ``(B, C, H, W)`` -> ``head(GAP(x))`` (``pool=True``), ``head(tail(module, x))``
        (with a ``tail``) or ``head(x)`` (called every step: no :class:`HookHead` is built here)."""
        head = self.module.get_submodule(self.head_name)
        if self.tail is not None:
            return head(self.tail(self.module, x))
        return head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) if self.pool else x)

    def rebuilt(self) -> HookBackbone:
        """A new backbone over the same module with the same settings (after its head was replaced)."""
        return HookBackbone(self.module, self.stage_names, self.head_name, self.input_shape, self.pool, self.tail,
                            self.stage_format)

    def split(self, at_stage: int) -> tuple[nn.Module, nn.Module]:
        """Not available: a hooked module has no trunk/tail structure to cut."""
        raise TypeError(  # permanent: no trunk/tail structure exists to cut
            "a HookBackbone (an adapted user module) cannot be split into trunk and tail: hooks see its stage "
            "outputs but not the code between them, so there is no tail to copy. Methods that grow branches on "
            "a shared trunk (ffl_s, one) need a zoo backbone (fusionkd.models.create_model) or a "
            "fusionkd.models.Backbone subclass; every other method (baseline, kd, fitnet, at, mfkd, dml, ffl, "
            "mfef, frskd, byot, fmfsd) accepts an adapted module"
        )

    # ----------------------------------------------------------------- internals
    def _submodule(self, name: str) -> nn.Module:
        if name:
            try:
                return self.module.get_submodule(name)
            except AttributeError:
                pass
        available = [n for n, _ in self.module.named_modules() if n]
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(available[:40]) + (
            f", ... ({len(available) - 40} more)" if len(available) > 40 else ""
        )
        raise UnknownNameError(
            f"{type(self.module).__name__} has no submodule {name!r}.{hint} "
            f"Available names (as in named_modules()): {shown or '(none)'}"
        )

    def _capture(self, x: torch.Tensor, stop_early: bool) -> tuple[list[torch.Tensor], Any]:
        """Run the wrapped module with hooks on the stage modules; return the maps and its output
        (``None`` when the run stopped after the last stage)."""
        captured: dict[int, torch.Tensor] = {}
        n = len(self.stage_names)

        def make_hook(i: int, name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(mod: nn.Module, args: Any, out: Any) -> None:
                if i in captured:
                    raise RuntimeError(
                        f"stage module {name!r} ran more than once in one forward pass; choose a module "
                        "that runs once (e.g. a block, not a shared activation)"
                    )
                if not isinstance(out, torch.Tensor) or out.dim() != 4:
                    got = (
                        f"a tensor of shape {tuple(out.shape)}"
                        if isinstance(out, torch.Tensor)
                        else type(out)
                    )
                    raise TypeError(f"stage module {name!r} must return a 4-D (B, C, H, W) tensor, got {got}")
                captured[i] = out.permute(0, 3, 1, 2) if self.stage_format == "NHWC" else out
                if stop_early and len(captured) == n:
                    raise _StagesCaptured

            return hook

        handles = [
            self._submodule(name).register_forward_hook(make_hook(i, name))
            for i, name in enumerate(self.stage_names)
        ]
        out = None
        try:
            out = self.module(x)
        except _StagesCaptured:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [self.stage_names[i] for i in range(n) if i not in captured]
        if missing:
            raise RuntimeError(
                f"stage modules {missing} did not run during {type(self.module).__name__}'s forward"
            )
        return [captured[i] for i in range(n)], out

    def _dry_run(self) -> None:
        """Fill ``stage_info`` (and ``num_classes`` / ``num_features`` if unknown) from one forward."""
        flags = {m: m.training for m in self.module.modules()}
        ref = next(self.module.parameters(), None)
        if ref is None:
            ref = next(self.module.buffers(), None)
        kwargs: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, *self.input_shape, generator=gen).to(**kwargs)
        self.module.eval()
        try:
            with torch.no_grad():
                # two forwards: within one, an in-place operation after the last stage (DenseNet's final
                # relu(inplace=True)) would rewrite the captured map and hide a difference from the head
                maps, _ = self._capture(x, stop_early=True)
                out = self.module(x)
                if not self._num_features:
                    self._num_features = maps[-1].shape[1]
                try:
                    logits = self.forward_head(maps[-1])
                except Exception as err:
                    raise ValueError(
                        f"the head {self.head_name!r} (pool={self.pool}, tail={getattr(self.tail, '__name__', None)}) "
                        f"cannot be applied to the last stage "
                        f"map {self.stage_names[-1]!r} of shape {tuple(maps[-1].shape)}: {err}"
                    ) from err
        finally:
            for m, flag in flags.items():
                m.training = flag
        height = self.input_shape[1]
        self.stage_info = [
            StageInfo(name, m.shape[1], max(1, round(height / m.shape[2])))
            for name, m in zip(self.stage_names, maps, strict=True)
        ]
        if not self.num_classes:
            self.num_classes = logits.shape[-1]
        #: whether ``forward_head(forward_stages(x)[-1]) == forward(x)`` held on the dry run
        self.keeps_contract = bool(
            isinstance(out, torch.Tensor)
            and out.shape == logits.shape
            and torch.allclose(out, logits, rtol=1e-4, atol=1e-5)
        )
        if not self.keeps_contract:
            warnings.warn(
                f"forward_head(forward_stages(x)[-1]) differs from the forward of "
                f"{type(self.module).__name__} (stages {self.stage_names}, head {self.head_name!r}, "
                f"pool={self.pool}); methods that apply the head to fused maps will not reproduce the "
                "module's own logits",
                stacklevel=3,
            )
