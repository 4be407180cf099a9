"""The method contract: what every distillation method is to the engine.

A method is an ``nn.Module`` that owns every trainable participant (networks, fusion modules,
self-teachers, branches; a frozen teacher too) and exposes:

* ``training_step(images, labels, epoch) -> {"loss_ce": ..., "loss_kd": ...}``: named loss terms,
  each a scalar tensor; the engine sums them, back-propagates, and logs each term;
* ``eval_logits(images) -> {"net": logits, ...}``: logits of every head the method trains;
* ``deploy_head``: the name of the head whose network ``deploy_model()`` returns (its validation
  accuracy selects ``best.pt``);
* ``param_groups(weight_decay)``: optimizer parameter groups (a fusion module can have its own decay);
* ``deploy_model()``: the plain network a user keeps, auxiliary parts dropped;
* ``extra_parameters()``: how many parameters the method adds on top of the deployed network.

A method that keeps per-sample state across steps (CRD's memory bank) sets ``needs_indices = True``: the
engine then also passes each training batch's dataset indices, ``training_step(images, labels, epoch,
indices=...)`` (int64 ``(B,)``, positions in the training split, on the batch's device), fills
``ctx.train_labels`` with the training split's labels in that order, and refuses MixUp / CutMix (a mixed
image is two samples). Every other method keeps the three-argument ``training_step``.

The loop, devices, precision, checkpoints and logging live in the engine, never in a method.
Adding a method is writing one file in ``fusionkd/methods/`` that defines a subclass and registers it
with ``@register_method("name", "one-line description")``; the package imports every module in the
folder, so nothing else has to be edited.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..models import create_model
from ..registry import Registry

log = logging.getLogger("fusionkd")

METHODS: Registry[type[Method]] = Registry("method")




def register_method(name: str, description: str):
    """Class decorator that registers a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name, description, family=cls.family)(cls)

    return deco


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


@dataclass
class Teacher:
    """A pre-trained, frozen teacher loaded from a checkpoint (offline methods).

    Attributes:
        model: the teacher network (a zoo backbone), frozen, in eval mode.
        model_name: its zoo name as stored in the checkpoint.
        meta: the checkpoint's metadata (dataset, classes, input shape, normalisation, accuracy).
    """

    model: nn.Module
    model_name: str
    meta: dict[str, Any] = field(default_factory=dict)


class EnsembleTeacher(nn.Module):
    """Several frozen teachers seen as one: ``forward(x) = sum_i w_i * logits_i(x)``, ``sum_i w_i = 1``.

    It offers logits only (no stage maps): the methods that read nothing but the teacher's logits (``kd``,
    ``dkd``, ``dist``: ``reads_teacher_maps = False``) take it. ``members`` are the teachers, in the order given;
    ``mix`` their weights (a buffer, kept in the checkpoint).
    """

    def __init__(self, members: list[nn.Module], mix: list[float] | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two or more teachers, got {len(members)}")
        weights = torch.tensor(mix if mix is not None else [1.0] * len(members), dtype=torch.float32)
        if weights.shape != (len(members),) or not torch.isfinite(weights).all() or (weights < 0).any() \
                or float(weights.sum()) <= 0:
            raise ValueError(f"teacher weights {mix} must be one finite number >= 0 per teacher, not all 0")
        self.members = nn.ModuleList(members)
        self.register_buffer("mix", weights / weights.sum())
        classes = {getattr(m, "num_classes", None) for m in members}
        chans = {getattr(m, "in_chans", None) for m in members}
        if len(classes) > 1 or len(chans) > 1:
            raise ValueError(f"the teachers disagree on classes {sorted(map(str, classes))} or input channels "
                             f"{sorted(map(str, chans))}")
        self.num_classes, self.in_chans = classes.pop(), chans.pop()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = None
        for w, m in zip(self.mix, self.members):
            z = m(images).float() * w
            out = z if out is None else out + z
        return out


@dataclass
class MethodContext:
    """Everything a method needs to build itself, resolved by the engine from the run config.

    Attributes:
        model: zoo name of the main network (the student / the network that is deployed).
        models: zoo names of the peer networks for methods with several networks (online KD);
            ``[model] * m`` when the peers share one architecture.
        num_classes, in_chans, image_size: what the data gives (square inputs).
        epochs: length of the run, for schedules inside a method (ramp-ups, stage lengths).
        model_kwargs: extra keyword arguments for every ``create_model`` call (config ``model_kwargs``: a
            ``torchvision:``/``timm:`` network's package keywords, a zoo factory's own ones); recorded with
            the deployed network (:attr:`Method.deploy_model_kwargs`) so that it is rebuilt with them.
        teacher: the frozen teacher for offline methods, else ``None``.
        weights: a weights file (config ``weights=``) that initialises every network of the main
            architecture ``model`` that :meth:`create` makes (the student, every peer, the self methods'
            network), see :func:`fusionkd.models.load_weights_file`; ``None`` for a fresh initialisation.
        pretrained: those same networks start from their package's published weights (config
            ``pretrained=true``, ``torchvision:``/``timm:`` names only; a new run only, like ``weights``).
    """

    model: str
    num_classes: int
    in_chans: int
    image_size: int
    epochs: int
    models: list[str] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: Teacher | None = None
    weights: str | None = None
    pretrained: bool = False
    #: what loading ``weights`` did, the first time (logged once, kept for the summary)
    weights_report: Any = None
    #: int64 ``(N,)``: the class of every training sample, by dataset index (the indices a method with
    #: ``needs_indices`` receives); filled by the engine only for such methods, else ``None``
    train_labels: torch.Tensor | None = None

    def create(self, name: str | None = None, pretrained: bool = True) -> nn.Module:
        """Create a network of zoo name ``name`` (default: the main model) for this data, initialised from
        ``weights`` when it is of the main architecture and ``pretrained`` (the default; ``False`` for a
        network whose weights are overwritten at once, e.g. a deploy network assembled from branches)."""
        name = name or self.model
        main = pretrained and name == self.model  # the main architecture, to be initialised
        published = {"pretrained": True} if self.pretrained and main else {}
        net = create_model(name, num_classes=self.num_classes, in_chans=self.in_chans, **self.model_kwargs,
                           **published)
        if self.weights and main:
            from ..models.weights import load_weights_file

            report = load_weights_file(net, self.weights, what=f"the {name!r} of this run")
            if self.weights_report is None:
                self.weights_report = report
                log.info("weights=%s: %s", self.weights, report.describe())
        return net


class Method(nn.Module):
    """Base class of every method. Subclasses set the class attributes and implement the four
    abstract members; they never touch devices, precision, optimizers or checkpoints.

    Class attributes:
        name: set by ``@register_method``.
        family: ``"baseline"``, ``"offline"``, ``"online"`` or ``"self"``.
        Options: a dataclass of the method's options with their defaults; the engine builds it from
            the ``options:`` section of the config and rejects unknown keys and wrong types.
        needs_teacher: offline methods set this; the engine then loads ``--teacher`` into
            ``ctx.teacher`` and checks that it matches the data.
        recipe_epochs: length, in epochs, of the published training recipe that the method's default
            options (loss weights, temperatures, ramp-ups) were set for, e.g. 200 for FRSKD (CIFAR-100),
            300 for FFL; ``None`` when the defaults come from no published recipe (``baseline``, our own
            design choices). A run shorter than :data:`SHORT_RUN_FRACTION` of it gets one warning at its
            start (:meth:`warn_short_run`).
        recipe_options: the options whose defaults that recipe fixed (they are named in the warning, and
            a user who sets any of them gets no warning); ``None``: every float-typed option.
        short_run_advice: what was measured for short runs (settings, where), appended to the warning;
            ``{epochs}`` in it becomes the run's length.
        needs_indices: the method needs each training sample's dataset index (see the module docstring):
            ``training_step`` then takes ``indices=``, and ``ctx.train_labels`` is filled.
        rebuilds_head: the method rebuilds the network's head from its parts ``pre -> pooling -> fc``
            (``byot``); a torchvision/timm network whose head is its own tail (a head norm, more layers before
            the classifier) is then refused before any work, not when the method is built.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "baseline"
    Options: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = False
    recipe_epochs: ClassVar[int | None] = None
    recipe_options: ClassVar[tuple[str, ...] | None] = None
    short_run_advice: ClassVar[str] = ""
    needs_indices: ClassVar[bool] = False
    rebuilds_head: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext, options: Any = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.options = options if options is not None else self.Options()
        self._frozen: list[nn.Module] = []

    # ----------------------------------------------------------------- to implement
    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """One forward pass on a training batch ``(B, C, H, W)``; returns named scalar loss terms."""
        raise NotImplementedError

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits ``(B, num_classes)`` of every head the method trains, by head name."""
        raise NotImplementedError

    @property
    def deploy_head(self) -> str:
        """Name (a key of ``eval_logits``) of the head that ``deploy_model()`` computes."""
        raise NotImplementedError

    def deploy_model(self) -> nn.Module:
        """The plain network a user keeps: an instance of zoo model ``deploy_model_name`` (it may share
        weights with the method; the engine saves its ``state_dict``)."""
        raise NotImplementedError

    @property
    def deploy_model_name(self) -> str:
        """Zoo name of the network ``deploy_model()`` returns (it is rebuilt from this name + weights)."""
        return self.ctx.model

    @property
    def deploy_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments ``deploy_model_name`` is rebuilt with (``eval``, ``export``, as a teacher): the
        run's ``model_kwargs``."""
        return dict(self.ctx.model_kwargs)

    # ----------------------------------------------------------------- optional hooks
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups; the default is one group of every trainable parameter."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay, "name": "all"}]

    def extra_parameters(self) -> int:
        """Parameters trained or used by the method beyond the deployed network."""
        return count_parameters(self) - count_parameters(self.deploy_model())

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the engine before each training epoch (0-based), e.g. to switch stages."""

    def on_validation(self, val_accuracy: dict[str, float]) -> None:
        """Called with each head's validation accuracy after every evaluation (e.g. to pick the best
        peer to deploy). Anything it decides must live in buffers so that it is checkpointed."""

    def summary_extras(self) -> dict[str, Any]:
        """Anything the method wants in ``summary.json`` (e.g. a teacher's accuracy)."""
        return {}

    def forward(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``training_step``: the engine calls the method (or its DDP wrapper) like a module. ``indices``
        (the batch's dataset indices) reach ``training_step`` only when the method ``needs_indices``."""
        if self.needs_indices:
            return self.training_step(images, labels, epoch, indices=indices)
        return self.training_step(images, labels, epoch)

    def warn_short_run(self, epochs: int, user_options: Mapping[str, Any] | None,
                       first_start: bool = True) -> str | None:
        """Log (once, at the start of a new run: ``first_start``) :func:`short_run_warning` when this run is
        much shorter than the recipe the method's defaults were published for; returns the message."""
        if not first_start:
            return None
        message = short_run_warning(type(self), epochs, user_options)
        if message:
            log.warning(message)
        return message

    # ----------------------------------------------------------------- helpers
    def freeze(self, module: nn.Module) -> nn.Module:
        """Freeze ``module``: no gradients, always in eval mode (BN statistics never change)."""
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        if all(module is not m for m in self._frozen):
            self._frozen.append(module)
        return module

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self


#: a run is "much shorter" than a method's recipe when ``epochs < SHORT_RUN_FRACTION * recipe_epochs``
#: (under 50 of FRSKD's 200 epochs, under 75 of FFL's 300): a recipe's loss weights and schedules are set
#: for its full length, and a quarter of it is a different training regime (FRSKD's alpha=2/beta=100 lost
#: 12 points to plain training in 8 epochs, see docs/methods/self.md "Short runs").
SHORT_RUN_FRACTION = 0.25


def recipe_option_names(method_cls: type[Method]) -> tuple[str, ...]:
    """The options that ``method_cls``'s recipe fixed: ``recipe_options``, or else every option whose type
    is ``float`` (loss weights, temperatures, ramp lengths; not counts, switches or names)."""
    if method_cls.recipe_options is not None:
        return tuple(method_cls.recipe_options)
    if not dataclasses.is_dataclass(method_cls.Options):
        return ()
    names = []
    for f in dataclasses.fields(method_cls.Options):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "float" in kind:
            names.append(f.name)
    return tuple(names)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_run_warning(method_cls: type[Method], epochs: int, user_options: Mapping[str, Any] | None) -> str | None:
    """The warning for a run of ``epochs`` with ``method_cls``'s defaults, or ``None`` when there is nothing to say.

    ``None`` when the method declares no ``recipe_epochs``, when the run is at least
    :data:`SHORT_RUN_FRACTION` of it, or when ``user_options`` (the ``options:`` the user gave, before
    defaults are filled in) sets any of :func:`recipe_option_names`.
    """
    recipe = method_cls.recipe_epochs
    if not recipe or epochs >= SHORT_RUN_FRACTION * recipe:
        return None
    names = recipe_option_names(method_cls)
    given = set(user_options or {})
    if not names or given & set(names):
        return None
    defaults = method_cls.Options()
    shown = " ".join(f"{n}={_short(getattr(defaults, n))}" for n in names)
    advice = method_cls.short_run_advice.format(epochs=epochs) or (
        "No setting for short runs has been measured for it: compare it with `baseline` on a validation split, "
        "or set these options yourself."
    )
    name = method_cls.name or method_cls.__name__
    return (f"{name}'s defaults ({shown}) were published for a {recipe}-epoch schedule; this run has {epochs} "
            f"(less than {SHORT_RUN_FRACTION:.0%} of it). {advice}")


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters in ``module``."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


class NetDeployment:
    """Deploy the method's own network ``self.net`` as the head ``"net"`` (baseline, the offline
    students, the self methods). List this class before :class:`Method` among the bases."""

    net: nn.Module

    @property
    def deploy_head(self) -> str:
        return "net"

    def deploy_model(self) -> nn.Module:
        return self.net
