"""fusionkd: feature-fusion knowledge distillation for image classification.

Quick start::

    import fusionkd
    result = fusionkd.train(method="baseline", model="resnet20", dataset="fashion-mnist", epochs=5)
    print(result.best_test_accuracy, result.run_dir)
"""

from .api import evaluate_checkpoint, export_checkpoint, list_registered, predict, resume, train  # noqa: E402
from .errors import FusionKDError  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["__version__", "FusionKDError", "train", "resume", "evaluate_checkpoint", "export_checkpoint", "predict",
           "list_registered"]
