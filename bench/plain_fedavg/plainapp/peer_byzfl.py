"""A peer's own training loop in the lab's paper-scale setting: ByzFL (`byzfl.benchmark.train`).

ByzFL 0.0.11's `start_training` runs FedAvg as one sequential loop in one process: every client
takes its local steps and hands its flat parameters to the server, the server averages them (the
`Average` aggregator, no attack here) and every client loads the new model. It runs here unmodified,
on the lab's network (registered in ByzFL's models module under a name of its own) and with its own
data pipeline, fed the same Fashion-MNIST files (unzipped into a temporary torchvision folder, since
ByzFL's loader would otherwise download them).
"""

from __future__ import annotations

import gzip
import itertools
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lab.config import ExperimentConfig
from lab.data import load_data
from lab.models import build_model
from lab.task import set_threads
from lab.torchvision_data import FASHION_MNIST, idx_search_path


def measure_byzfl(cfg: ExperimentConfig, work: Path) -> dict[str, Any]:
    """ByzFL's `start_training` (its FedAvg loop) in this setting; see the module docstring."""
    import byzfl.benchmark.train  # noqa: F401 (registers the module; only here: ByzFL is a test extra)
    import byzfl.fed_framework.models as byz_models

    # `byzfl` rebinds the attribute `byzfl.benchmark` to its benchmark.py module, so
    # `import byzfl.benchmark.train as x` fails; the module itself is registered all right.
    byz_train = sys.modules["byzfl.benchmark.train"]
    if cfg.dataset.name != "fashion-mnist":
        raise ValueError(f"the ByzFL peer runs Fashion-MNIST only, not {cfg.dataset.name}")
    set_threads(cfg.execution.num_threads)
    data = load_data(cfg.dataset, cfg.seed)
    # torchvision (ByzFL's loader) wants the unzipped files in <root>/FashionMNIST/raw.
    raw = work / "data" / FASHION_MNIST.cls_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    source = next(d for d in idx_search_path(FASHION_MNIST, Path(cfg.dataset.data_dir).resolve())
                  if all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in FASHION_MNIST.files))
    for f in FASHION_MNIST.files:
        plain, packed = source / f, source / f"{f}.gz"
        with (open(plain, "rb") if plain.is_file() else gzip.open(packed, "rb")) as src, open(raw / f, "wb") as dst:
            shutil.copyfileobj(src, dst)
    # ByzFL builds models by name from its models module: the lab's network goes in under one.
    byz_models.lab_fltrust_cnn = lambda: build_model(cfg.training.model, data.image_shape, data.num_classes,
                                                     data.mean, data.std)
    stamps: list[float] = []

    class TimedServer(byz_train.Server):  # type: ignore[misc]
        def update_model_with_weights(self, weights: Any) -> None:
            super().update_model_with_weights(weights)
            stamps.append(time.perf_counter())

    t, n = cfg.training, cfg.federated.num_clients
    params = {
        "benchmark_config": {
            "device": "cpu", "training_seed": cfg.seed, "data_distribution_seed": cfg.seed,
            "nb_honest_clients": n, "f": 0, "size_train_set": 1.0, "nb_steps": t.rounds,
            "data_distribution": {"name": "gamma_similarity_niid", "distribution_parameter": 0.5},
            "training_algorithm": {"name": "FedAvg", "parameters": {
                "proportion_selected_clients": 1.0, "local_steps_per_client": t.local_steps or 1}},
        },
        "model": {"name": "lab_fltrust_cnn", "dataset_name": "fashionmnist", "nb_labels": data.num_classes,
                  "loss": "CrossEntropyLoss", "optimizer_name": "SGD", "learning_rate": float(t.lr),
                  "learning_rate_decay": 1.0, "milestones": []},
        "aggregator": {"name": "Average", "parameters": {}},
        "pre_aggregators": [],
        "honest_clients": {"momentum": 0.0, "weight_decay": float(t.weight_decay), "batch_size": t.batch_size},
        "attack": {"name": "NoAttack", "parameters": {}},
        "evaluation_and_results": {"evaluation_delta": t.rounds + 1, "evaluate_on_test": False,
                                   "store_per_client_metrics": False, "store_models": False,
                                   "data_folder": str(work / "data"), "results_directory": str(work / "results")},
    }
    original = byz_train.Server
    byz_train.Server = TimedServer
    try:
        started = time.perf_counter()
        byz_train.start_training(params)
        total = time.perf_counter() - started
    finally:
        byz_train.Server = original
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"round_s": statistics.median(gaps), "round_seconds": [round(g, 3) for g in gaps],
            "total_s_with_setup": total, "processes": 1,
            "differences": "ByzFL's data pipeline (torchvision dataset, PIL ToTensor + random flip per "
                           "sample, DataLoader per client) and split (gamma-similarity 0.5, not the bias "
                           "split); sequential clients in one process; round = gap between server updates, "
                           "rounds 2..R; no evaluation"}

