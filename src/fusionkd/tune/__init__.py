"""``fusionkd tune``: hyper-parameter search with Optuna, scored only on validation accuracy.

A **study** tunes one method's options and any common config keys. Each **trial** is one ``fusionkd train``
run (folder ``OUT/trials/trial-NNNN``) whose score is the deploy head's best *validation* accuracy (the
``best.pt`` epoch); every evaluated epoch reports its validation accuracy to the pruner (median rule or
successive halving), which may stop the trial early. The test split is never read by a trial: the trainer
runs with ``use_test=False``, so the dataset is loaded without it (Fashion-MNIST's test files are not even
opened) and nothing is evaluated on it.

The study lives in an Optuna storage (``sqlite:///study.db``): a killed study resumes where it stopped (the
trial that was running when its process died is marked failed and its parameters are queued again), and
several processes running the same command share the work. At the end ``OUT/best.yaml`` (for ``fusionkd
train --config``) and ``OUT/best-compare.yaml`` (for ``fusionkd compare --config``) hold the best settings,
and ``--confirm-seeds`` trains the best settings, the method's defaults and the baseline on several seeds
(through ``compare``) and writes ``OUT/tune.md``. Optuna is the ``tune`` extra (``pip install
'fusionkd[tune]'``). See docs/tune.md.

A study folder is deliberately *not* locked as a whole (several processes may share one study); each trial's
run folder is locked by the trainer, and the confirmation's ``compare`` output folders are locked by
:func:`~fusionkd.compare.grid.compare`: a second worker reaching the confirmation waits for the first one's
``compare`` to finish and then finds its runs finished (kept, not retrained).

Modules: :mod:`~fusionkd.tune.space` (the search space), :mod:`~fusionkd.tune.study` (the study and its trials),
:mod:`~fusionkd.tune.results` (best settings, confirmation, ``tune.md``); every name is importable from here.
"""

from __future__ import annotations

from .results import best_settings, confirm, trials_table, write_best, write_markdown
from .space import KINDS, RESERVED, Param, parse_common, parse_distribution, parse_space
from .study import (
    MAX_FAILURES_IN_A_ROW,
    NOT_SETTINGS,
    PRUNERS,
    SAMPLERS,
    PruningCallback,
    Report,
    TuneSpec,
    base_layers,
    check_spec,
    format_params,
    open_study,
    optuna_module,
    recover_interrupted,
    run_study,
)

__all__ = ["KINDS", "MAX_FAILURES_IN_A_ROW", "NOT_SETTINGS", "PRUNERS", "RESERVED", "SAMPLERS", "Param",
           "PruningCallback", "Report", "TuneSpec", "base_layers", "best_settings", "check_spec", "confirm",
           "format_params", "open_study", "optuna_module", "parse_common", "parse_distribution", "parse_space",
           "recover_interrupted", "run_study", "trials_table", "write_best", "write_markdown"]
