"""The experiment's schema: one frozen dataclass per YAML section, with the defaults.

YAML keys are snake_case because they map onto these fields one to one. Loading, overrides and
validation live in `lab.config`, which re-exports these names: import them from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

DatasetName = Literal["digits", "mnist", "fashion-mnist", "emnist-digits", "cifar10"]
AttackType = Literal["none", "backdoor", "scaling", "label-flip", "sign-flip", "gaussian-noise",
                     "trim-attack", "krum-attack", "min-max", "min-sum", "alie", "ipm",
                     "dba", "blended", "neurotoxin", "a3fl", "edge-case"]
# Attacks computed over the update matrix (byzantine/); the others poison data or transform the
# attacker's own update in the ClientApp.
UPDATE_MATRIX_ATTACKS = frozenset({"trim-attack", "krum-attack", "min-max", "min-sum", "alie", "ipm"})
Knowledge = Literal["auto", "full", "partial"]
Perturbation = Literal["unit-vec", "sign", "std"]
TrimExtremes = Literal["benign", "all"]
TrimSample = Literal["uniform", "farthest"]
PoisonMode = Literal["mix", "append"]
TriggerShape = Literal["square", "checkerboard", "cross"]
Position = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"]


@dataclass(frozen=True)
class DatasetConfig:
    name: DatasetName = "digits"
    data_dir: str = "data"
    download: bool = True
    # Digits are 8x8; upsampled so the same CNN (and trigger sizes) fit MNIST-sized inputs.
    image_size: int | None = None
    test_fraction: float = 0.2
    # Share of the training split held out as the server's clean set (FLTrust root set, unlearning).
    server_fraction: float = 0.1
    source_class: int | None = 1  # None = all-to-one
    target_class: int = 0


@dataclass(frozen=True)
class PreAggregatorConfig:
    name: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregatorConfig:
    name: str = "fedavg"
    params: Mapping[str, Any] = field(default_factory=dict)
    # Pre-aggregators applied in order before the rule (strategies.pre_aggregation): `[nnm]` or
    # `[{name: nnm, params: {f: 2}}]`; names and parameters are checked by strategies.registry.
    pre: tuple[str | PreAggregatorConfig, ...] = ()


@dataclass(frozen=True)
class FederatedConfig:
    num_clients: int = 10
    clients_per_round: int | None = None  # None = all clients (see fraction)
    fraction: float = 1.0
    # iid; dirichlet (alpha per label); bias: FLTrust's / Fang et al.'s non-IID split with h = bias_h
    partitioning: Literal["iid", "dirichlet", "bias"] = "iid"
    dirichlet_alpha: float = 0.5
    # dirichlet: flwr-datasets' self-balancing (a client past the average size takes no more, so the
    # labels drawn last miss many clients); false: the plain per-label Dirichlet (FL-Defender's code)
    dirichlet_balance: bool = True
    bias_h: float = 0.5  # bias: share of a label's examples that stay with that label's client group
    # None: attackers are sampled like everyone; k: exactly k of each round's sampled clients are
    # malicious (experiment design, from the simulation's ground truth; no defense sees it).
    attackers_per_round: int | None = None
    # FedAvg's weighted sum divided by the sampled clients' weight, or by all clients' (Bagdasaryan et al.).
    fedavg_divisor: Literal["sampled", "total"] = "sampled"
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    server_lr: float = 1.0

    @property
    def round_size(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        return max(1, round(self.fraction * self.num_clients))


@dataclass(frozen=True)
class TrainingConfig:
    model: Literal["cnn", "mlp", "resnet18", "fltrust-cnn", "lenet", "softmax"] = "cnn"
    rounds: int = 20
    local_epochs: int = 1
    local_steps: int | None = None  # when set, overrides local_epochs
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    eval_every: int = 1  # central evaluation every N rounds (always round 0 and the last round)


@dataclass(frozen=True)
class TriggerConfig:
    shape: TriggerShape = "square"
    size: int = 3
    position: Position = "bottom-right"
    margin: int = 1
    value: float = 1.0  # pixel intensity in [0, 1], all channels


@dataclass(frozen=True)
class AttackConfig:
    type: AttackType = "none"
    # A list runs one experiment per value (`fl-lab run` makes a subfolder for each).
    attackers_ratio: float | tuple[float, ...] = 0.0
    malicious_behavior_rate: float = 1.0
    start_round: int = 1
    end_round: int | None = None
    poison_mode: PoisonMode = "mix"
    poison_ratio: float = 0.5
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    # Model replacement: scale the update by this factor; "auto" = clients in the round / server lr.
    boost: float | Literal["auto"] = 1.0
    # Norm-constrained evasion: project the (boosted) update onto this L2 ball.
    norm_bound: float | None = None
    noise_std: float = 1.0  # gaussian-noise attack
    sign_flip_scale: float = 1.0  # sign-flip attack: send -scale * honest update
    # The threat model: "full" = a colluding adversary handed the round's benign updates (a
    # server-side hook: simulation only); "partial" = each attacker knows only its own honest update
    # (the ClientApp). "auto" = full for the UPDATE_MATRIX_ATTACKS (the papers' setting), partial
    # for the others, which only ever use the attacker's own data or update.
    knowledge: Knowledge = "auto"
    alie_z: float | None = None  # alie: mu - z * sigma; None = Baruch et al.'s z_max from n and f
    ipm_epsilon: float = 0.5  # ipm: -epsilon * mean of the benign updates
    minmax_perturbation: Perturbation = "unit-vec"  # min-max / min-sum: the direction grad_p
    # min-max / min-sum: the search's first gamma (Shejwalkar & Houmansadr's code: 10). The search
    # never goes past twice it, and gamma is in the units of the updates: model changes here, the
    # raw gradients in the papers' code (a card converts, as it does the learning rate).
    minmax_gamma_init: float = 10.0
    # trim-attack: whose extremes it goes beyond (the paper: the benign ones; "all" adds the
    # attackers' own honest updates, as the FLTrust family's scripts do) and where in the interval
    # (the paper: uniform; "farthest": its far end, as one of Fang et al.'s scripts does).
    trim_extremes: TrimExtremes = "benign"
    trim_sample: TrimSample = "uniform"
    # The 2025 backdoors (client/attacks.py): DBA's parts of the global trigger (None = one per
    # attacker), Blended's opacity, Neurotoxin's excluded share of coordinates, A3FL's budget.
    dba_parts: int | None = None
    blend_alpha: float = 0.2  # Chen et al. 2017: alpha_train = 0.2
    neurotoxin_topk: float = 0.05  # the top 5% most-changed coordinates are left alone (mask ratio 0.95)
    a3fl_trigger_steps: int = 10  # signed-gradient steps on the trigger per round
    a3fl_trigger_lr: float = 0.05  # step size in pixel units ([0, 1] images)
    a3fl_adversary_steps: int = 5  # SGD steps that adapt the global copy to unlearn the trigger
    a3fl_adversary_weight: float = 1.0  # lambda: the adapted model's share of the trigger loss
    edge_case_class: int = 1  # edge-case: the Fashion-MNIST class (1 = trouser) labelled as the target

    @property
    def ratios(self) -> tuple[float, ...]:
        r = self.attackers_ratio
        return r if isinstance(r, tuple) else (r,)

    @property
    def plants_trigger(self) -> bool:
        """Does the attack stamp `trigger` as configured (the backdoor, Scaling, which is a boosted
        backdoor, DBA, whose parts add up to it, and Neurotoxin)? Blended stamps a full-image pattern
        and A3FL optimises the pattern inside the trigger's box."""
        return self.type in ("backdoor", "scaling", "dba", "neurotoxin")

    @property
    def resolved_knowledge(self) -> Literal["full", "partial"] | None:
        """`knowledge` with "auto" resolved (None without an attack)."""
        if self.type == "none":
            return None
        if self.knowledge != "auto":
            return self.knowledge
        return "full" if self.type in UPDATE_MATRIX_ATTACKS else "partial"


@dataclass(frozen=True)
class ProbeConfig:
    """Local hyperparameters a curious server imposes on the clients it captures."""

    local_steps: int = 1
    batch_size: int = 1
    lr: float = 0.01
    # Send the global model of this earlier round instead of the current one. A well-fit model's
    # gradients carry little of the images it already fits (a learned backdoor's most of all); the
    # replies are rebased onto the current model, so training goes on as with a plain probe.
    model_round: int | None = None


@dataclass(frozen=True)
class CaptureConfig:
    enabled: bool = False
    rounds: tuple[int, ...] = ()
    # suspects (honest): the server's own top_k suspects (the rule's drops and suspicion, else the
    # similarity of update histories); all (honest); a list of partitions; malicious: ground truth,
    # an UPPER BOUND a real server cannot run, marked as such in every output.
    clients: Literal["suspects", "all", "malicious"] | tuple[int, ...] = "suspects"
    top_k: int = 3  # how many suspects `suspects` captures
    probe: ProbeConfig | None = None
    max_bytes: int = 200_000_000
    evidence: bool = False  # simulation only: store the exact images used, for scoring


@dataclass(frozen=True)
class InversionConfig:
    attack: str = "inverting-gradients"
    preset: str = "fast-cpu"
    labels: Literal["known", "recovered"] = "recovered"
    num_images: int | None = None
    iterations: int | None = None
    restarts: int | None = None
    tv: float | None = None


@dataclass(frozen=True)
class UnlearningConfig:
    strategies: tuple[str, ...] = ("transplant", "relabel", "clean-finetune")
    clean_samples: int | None = None  # None = the whole server clean set
    steps: int = 100
    lr: float = 0.005  # 0.01 cost 1.0 +- 1.5 accuracy points on the digits runs; 0.005 cost 0.4
    momentum: float = 0.9
    batch_size: int = 32
    mix_ratio: float = 0.2
    freeze_bn: bool = True
    max_accuracy_drop: float = 0.02


@dataclass(frozen=True)
class ExecutionConfig:
    output_dir: str = "runs"
    num_threads: int = 1  # OpenMP spin-waits badly on a shared 2-core box
    client_cpus: float = 2.0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    checkpoint_every: int = 1
    reconstruction_only: bool = False
    resume: bool = False
    # Simulation: one Flower message per client, or cohorts of clients per message (lab.cohort).
    messages: Literal["auto", "per-client", "cohort"] = "auto"
    workers: int | None = None  # simulation worker processes in a cohort run (None: the usable cores)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    @property
    def seed(self) -> int:
        return self.training.seed

    def settings(self) -> dict[str, object]:
        """The federation settings papers differ in, under their config key paths (summary.json `settings`)."""
        f, t = self.federated, self.training
        out: dict[str, object] = {"dataset.name": self.dataset.name, "training.model": t.model,
                                  "federated.num_clients": f.num_clients, "federated.partitioning": f.partitioning}
        if f.partitioning == "bias":
            out["federated.bias_h"] = f.bias_h
        elif f.partitioning == "dirichlet":
            out["federated.dirichlet_alpha"] = f.dirichlet_alpha
            out["federated.dirichlet_balance"] = f.dirichlet_balance
        out.update({
            "federated.clients_per_round": f.round_size,
            "federated.attackers_per_round": f.attackers_per_round,
            "federated.fedavg_divisor": f.fedavg_divisor,
            "federated.server_lr": f.server_lr,
            "training.local_steps": t.local_steps,
            "training.local_epochs": None if t.local_steps is not None else t.local_epochs,
            "training.batch_size": t.batch_size,
            "training.lr": t.lr,
            "training.eval_every": t.eval_every,
        })
        return out
