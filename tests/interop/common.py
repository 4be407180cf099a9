"""What the interop tests share: the run settings of a tiny synthetic run (:func:`tiny`) and the timm ViT."""

from __future__ import annotations

from typing import Any

#: timm's ViT-Tiny, the vision transformer of the tests (shrunk with model_kwargs where speed matters)
VIT = "timm:vit_tiny_patch16_224"


def data(train_size: int = 48, test_size: int = 16) -> dict[str, Any]:
    """``dataset_options`` of a synthetic 4-class, 1-channel dataset."""
    return {"num_classes": 4, "in_chans": 1, "train_size": train_size, "test_size": test_size}


def tiny(image_size: int = 32, train_size: int = 48, test_size: int = 16, batch_size: int = 16,
         **overrides: Any) -> dict[str, Any]:
    """The settings of a one-epoch run on :func:`data` (a quarter held out for validation, one thread, no
    progress output); ``overrides`` adds or replaces keys (``epochs=None`` drops the epoch count)."""
    settings = dict(dataset="synthetic", dataset_options=data(train_size, test_size), image_size=image_size,
                    val_fraction=0.25, batch_size=batch_size, eval_batch_size=64, epochs=1, lr=0.05,
                    progress="none", threads=1)
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}
