"""``tiny_ls``: one network, cross-entropy with label smoothing."""

from dataclasses import dataclass

import torch.nn.functional as F

from fusionkd.methods import Method, register_method
from fusionkd.methods.base import NetDeployment


@register_method("tiny_ls", "one network, label-smoothed cross-entropy (example plug-in)")
class TinyLabelSmoothing(NetDeployment, Method):
    family = "baseline"

    @dataclass
    class Options:
        smoothing: float = 0.1

    def __init__(self, ctx, options=None):
        super().__init__(ctx, options)
        self.net = ctx.create()

    def training_step(self, images, labels, epoch):
        return {"loss_ce": F.cross_entropy(self.net(images), labels, label_smoothing=self.options.smoothing)}

    def eval_logits(self, images):
        return {"net": self.net(images)}
