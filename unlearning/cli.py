"""Command lines: `fl-lab verify RUN_DIR` and `fl-lab unlearn RUN_DIR` (= `python -m unlearning`).

    fl-lab verify runs/default                      # writes runs/default/verification.json
    fl-lab verify runs/default --image recon.png    # classify one image (the original predict.py)
    fl-lab unlearn runs/default [--oracle] [--steps 100 --lr 0.01 ...]

`unlearn` recovers the trigger from the reconstructions (never from the config), fine-tunes one
copy of the final model per strategy on the server's clean set, evaluates each on the test set
(ASR with the true trigger, evaluation only) and writes RUN/unlearning/{<strategy>.safetensors,
sanitized.safetensors, metrics.json}. All computing happens before the first write, so bad input
(exit code 2, one line on stderr) leaves nothing behind, and so does a refusal (exit code 3, one
line): the recovered trigger fails the server's own check (`--min-flip-rate`; `--force` overrides).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lab import log as lablog
from lab.artifacts import save_tensors, write_json
from lab.config import UnlearningConfig
from lab.data import Split
from lab.errors import ConfigError, LabError
from lab.metrics import predict
from lab.runfolder import contained
from lab.task import generator, set_threads
from unlearning.ensemble import ensemble
from unlearning.materials import Plan, recover
from unlearning.methods import (LAYERS, STRATEGIES, Budget, FinetuneResult, StrategyError, accuracy,
                                accuracy_floor, finetune, get_strategy)
from unlearning.trigger import server_flip_rate
from unlearning.verify import (NoReconstructions, Reconstructions, Run, RunFolderError, capture_of,
                               load_reconstructions, load_run, read_image, verify)

log = logging.getLogger(__name__)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------
# verify


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-lab verify", description="Does the backdoor fire, and on the reconstructions?")
    p.add_argument("run_dir", help="a run folder (config.yaml, final.safetensors, inversion/)")
    p.add_argument("--image", help="classify this PNG or .safetensors image instead (writes nothing)")
    p.add_argument("--checkpoint", help="model weights (default: RUN_DIR/final.safetensors)")
    p.add_argument("--recon", help="reconstruction folder (default: RUN_DIR/inversion)")
    return p


def verify_main(argv: Sequence[str] | None = None) -> int:
    args = verify_parser().parse_args(argv)
    lablog.configure("WARNING")
    return _guard("verify", _verify, args)


def _verify(args: argparse.Namespace) -> int:
    run = load_run(Path(args.run_dir), Path(args.checkpoint) if args.checkpoint else None)
    set_threads(run.cfg.execution.num_threads)
    if args.image:
        return _classify(run, Path(args.image))
    root = Path(args.recon) if args.recon else contained(run.path, "inversion", "reconstruction folder")
    try:
        recon: Reconstructions | None = load_reconstructions(root, run.data.image_shape, run.data.num_classes)
    except NoReconstructions as exc:  # nothing inverted yet: verify the model alone (a damaged file exits 2)
        log.warning("%s", exc)
        recon = None
    result = verify(run, recon)
    write_json(run.path / "verification.json", result)
    _out(f"{'model':<22} accuracy {_fmt(result['accuracy'])}  asr {_fmt(result['asr'])} (true trigger, "
         f"evaluation only)  source-class accuracy {_fmt(result['source_accuracy'])}")
    if not result["reconstructions"]:
        _out(f"no reconstructions under {root}")
    else:
        _out(f"{'reconstruction':<34} {'label':>5} {'pred':>4} {'p(target)':>9}  fires target {run.target}?")
        for r in result["reconstructions"]:
            _out(f"{r['entry'] + '[' + str(r['index']) + ']':<34} {r['label']:>5} {r['predicted']:>4} "
                 f"{r['target_probability']:>9.3f}  {'yes' if r['fires_target'] else 'no'}")
        _out(f"{result['fires_target']}/{result['num_reconstructions']} reconstructions fire the backdoor")
    _out(f"wrote {run.path / 'verification.json'}")
    return 0


def _classify(run: Run, path: Path) -> int:
    x = read_image(path, run.data.image_shape)
    probs = predict(run.model, x).softmax(1)
    for i, p in enumerate(probs):
        top = p.topk(min(3, len(p)))
        cls = int(top.indices[0])
        others = ", ".join(f"{int(c)}: {float(v):.3f}" for c, v in zip(top.indices, top.values))
        name = f"{path.name}[{i}]" if len(probs) > 1 else path.name
        _out(f"{name}: predicted class {cls} (p={float(top.values[0]):.3f}; top {others}); "
             f"backdoor target {run.target}: {'FIRED' if cls == run.target else 'not fired'}")
    return 0


# ------------------------------------------------------------------------------------------
# unlearn


def unlearn_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-lab unlearn",
                                description="Fine-tune the backdoor away with the reconstructions and clean data.")
    p.add_argument("run_dir", help="a run folder with final.safetensors and inversion/")
    p.add_argument("--strategy", action="append", choices=sorted(STRATEGIES),
                   help="repeatable (default: the run config's unlearning.strategies)")
    p.add_argument("--oracle", action="store_true",
                   help="also run the UPPER BOUND with the TRUE trigger (breaks the threat model; marked)")
    p.add_argument("--checkpoint", help="model weights (default: RUN_DIR/final.safetensors)")
    p.add_argument("--recon", help="reconstruction folder (default: RUN_DIR/inversion)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/unlearning)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mix-ratio", type=float, help="share of each batch stamped (transplant) or reconstructions (relabel)")
    p.add_argument("--clean-samples", type=int, help="use at most this many server clean images")
    p.add_argument("--max-accuracy-drop", type=float, help="early-stop budget on validation accuracy")
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this share of the server's clean set for the accuracy budget and the checkpoint "
                        "choice (lowest ASR of the RECOVERED trigger on it); 0: the fine-tuning images, blind to an "
                        "accuracy loss, yet 0.2 of ~144 digits images cost 1-3 test points (bench/RESULTS.md)")
    p.add_argument("--eval-every", type=int, default=10, help="validation interval in steps")
    p.add_argument("--patience", type=int, default=10,
                   help="validations in a row below the accuracy budget before the early stop (it only saves time: "
                        "the kept checkpoint is always within budget; 3 stopped the target penalty's early dip)")
    p.add_argument("--distill", type=float, default=1.0,
                   help="weight of self-distillation towards the original model on clean-image rows "
                        "(0 = plain cross-entropy, the original recipe)")
    p.add_argument("--target-penalty", type=float, default=0.3,
                   help="weight of the hinge that pushes the target logit of stamped images below their best other "
                        "class by --penalty-margin (0 = labels and distillation only, the previous recipe)")
    p.add_argument("--penalty-margin", type=float, default=1.0, help="logits the target must trail by")
    p.add_argument("--layers", choices=LAYERS, default="all",
                   help="what trains: all, or only the model's last linear layer (head)")
    p.add_argument("--soup", type=int, default=3, help="average this many fine-tunes that differ only in their draws")
    p.add_argument("--blend", type=float, default=0.7, help="keep this share of the (averaged) weight change; both "
                   "only while the recovered trigger fires no more on the validation images than after one fine-tune")
    p.add_argument("--box-slack", type=int, default=1,
                   help="transplant also stamps the boxes within this many pixels of the recovered one that "
                        "flip the server's clean images as well (0 = the recovered box only)")
    p.add_argument("--refine-steps", type=int, default=100,
                   help="re-fit the recovered pattern inside its box on the server's clean images for this "
                        "many steps before stamping it (0 = the reconstructions' values as they are)")
    p.add_argument("--min-flip-rate", type=float, default=0.05,
                   help="refuse (exit 3) when the recovered trigger sends fewer of the server's clean images to "
                        "the target: then it is not the backdoor's trigger (default 0.05; the digits runs: 0.16-0.77)")
    p.add_argument("--search-steps", type=int, default=200, help="a refused box gets a Neural Cleanse-style mask "
                   "search near it, used if it passes the check and beats its mirror-image controls (0 = none)")
    p.add_argument("--force", action="store_true",
                   help="unlearn even when the recovered trigger fails the --min-flip-rate check")
    p.add_argument("--sanitized", choices=sorted(set(STRATEGIES) - {"oracle"}),
                   help="which strategy's model becomes sanitized.safetensors (default: the first listed)")
    p.add_argument("--seed", type=int, help="default: the run's training.seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def unlearn_main(argv: Sequence[str] | None = None) -> int:
    args = unlearn_parser().parse_args(argv)
    lablog.configure("WARNING")
    return _guard("unlearn", _unlearn, args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m unlearning [verify|unlearn] ...`; without a subcommand it unlearns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return verify_main(argv[1:])
    if argv and argv[0] == "unlearn":
        return unlearn_main(argv[1:])
    return unlearn_main(argv)


def _guard(name: str, fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args))
    except LabError as exc:
        sys.stderr.write(f"{name}: {str(exc).strip()}\n")
        return int(getattr(exc, "exit_code", 2))


def plan(run: Run, args: argparse.Namespace) -> Plan:
    """Resolve strategies and hyperparameters (config, then flags); refuse what cannot run."""
    u = run.cfg.unlearning
    names = list(args.strategy or u.strategies)
    for n in names:
        get_strategy(n)  # unknown names fail loudly
    if "oracle" in names and not args.oracle:
        raise ConfigError("strategy 'oracle' uses the ground-truth trigger; ask for it with --oracle")
    if args.oracle and "oracle" not in names:
        names.append("oracle")
    if args.oracle and run.true_trigger() is None:
        raise ConfigError("--oracle: the run has no backdoor trigger to use as an upper bound")
    names = list(dict.fromkeys(names))
    honest = [n for n in names if not STRATEGIES[n].oracle]
    if not honest:
        raise ConfigError("only the oracle was requested; add a strategy that uses the reconstructions")
    hp = UnlearningConfig(
        strategies=tuple(names),
        clean_samples=args.clean_samples if args.clean_samples is not None else u.clean_samples,
        steps=args.steps or u.steps, lr=args.lr or u.lr,
        momentum=args.momentum if args.momentum is not None else u.momentum,
        batch_size=args.batch_size or u.batch_size,
        mix_ratio=args.mix_ratio if args.mix_ratio is not None else u.mix_ratio,
        freeze_bn=args.freeze_bn if args.freeze_bn is not None else u.freeze_bn,
        max_accuracy_drop=args.max_accuracy_drop if args.max_accuracy_drop is not None else u.max_accuracy_drop,
    )
    problems = [msg for ok, msg in (
        (hp.steps >= 1, "--steps must be >= 1"), (hp.lr > 0, "--lr must be > 0"),
        (0 <= hp.momentum < 1, "--momentum must be in [0, 1)"), (hp.batch_size >= 1, "--batch-size must be >= 1"),
        (0 <= hp.mix_ratio <= 1, "--mix-ratio must be in [0, 1]"),
        (hp.clean_samples is None or hp.clean_samples >= 1, "--clean-samples must be >= 1"),
        (0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (args.eval_every >= 1, "--eval-every must be >= 1"),
        (args.patience >= 1, "--patience must be >= 1"),
        (0 <= args.distill <= 1, "--distill must be in [0, 1]"),
        (0 <= args.box_slack <= 3, "--box-slack must be in 0..3"),
        (args.refine_steps >= 0, "--refine-steps must be >= 0"),
        (0 <= args.min_flip_rate <= 1, "--min-flip-rate must be in [0, 1]"),
        (args.search_steps >= 0, "--search-steps must be >= 0"),
        (args.target_penalty >= 0, "--target-penalty must be >= 0"),
        (args.penalty_margin >= 0, "--penalty-margin must be >= 0"),
        (0 < args.blend <= 1, "--blend must be in (0, 1]"), (args.soup >= 1, "--soup must be >= 1"),
    ) if not ok]
    if problems:
        raise ConfigError(problems)
    sanitized = args.sanitized or honest[0]
    if sanitized not in names:
        raise ConfigError(f"--sanitized {sanitized}: not among the strategies run ({', '.join(names)})")
    return Plan(tuple(names), hp, sanitized, run.cfg.seed if args.seed is None else args.seed, args.box_slack,
                args.refine_steps, args.min_flip_rate, args.force, args.search_steps)


def clean_sets(run: Run, p: Plan, val_fraction: float) -> tuple[Split, Split]:
    """(fine-tuning set, validation slice) from the server's held-out clean set."""
    server = run.data.server
    if len(server) == 0:
        raise RunFolderError("the server has no clean data (dataset.server_fraction is 0); "
                             "unlearning needs the server's held-out clean set")
    order = torch.randperm(len(server), generator=generator(p.seed, "unlearning-clean"))
    if p.hp.clean_samples is not None:
        order = order[: p.hp.clean_samples]
    n_val = int(round(val_fraction * len(order)))
    train, val = server.subset(order[n_val:]), server.subset(order[:n_val])
    if len(train) == 0:
        raise RunFolderError(f"--val-fraction {val_fraction} leaves no clean images to fine-tune on")
    return train, (val if n_val else train)


def _unlearn(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    run = load_run(Path(args.run_dir), Path(args.checkpoint) if args.checkpoint else None)
    set_threads(run.cfg.execution.num_threads)
    p = plan(run, args)
    root = Path(args.recon) if args.recon else contained(run.path, "inversion", "reconstruction folder")
    recon = load_reconstructions(root, run.data.image_shape, run.data.num_classes)
    train, val = clean_sets(run, p, args.val_fraction)
    # Checked before any work: a planted `unlearning` link may not carry the writes out of the run.
    out = Path(args.out) if args.out else contained(run.path, "unlearning", "output folder")

    found, materials, trigger_info = recover(run, recon, train, p)  # refuses an unconfirmed trigger
    before = run.evaluate()
    val_before = accuracy(run.model, val)
    budget = Budget(p.hp.steps, p.hp.lr, p.hp.momentum, p.hp.batch_size, p.hp.freeze_bn,
                    min_accuracy=accuracy_floor(val_before, p.hp.max_accuracy_drop, len(val)), eval_every=args.eval_every,
                    patience=args.patience, distill=args.distill, target_penalty=args.target_penalty,
                    penalty_margin=args.penalty_margin, layers=args.layers)
    results: dict[str, FinetuneResult] = {}
    after: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in p.strategies:
        strategy = STRATEGIES[name]
        try:
            transform = strategy.build(materials)
        except StrategyError as exc:  # a comparison strategy without its materials must not sink the cure
            if name == p.sanitized:
                raise
            log.warning("unlearn: skipping %s: %s", name, exc)
            skipped[name] = str(exc)
            continue
        label = f"{name} (ORACLE)" if strategy.oracle else name
        bar = tqdm(total=p.hp.steps * args.soup, desc=f"unlearn {label}", unit="step", leave=False,
                   disable=True if args.quiet else None)

        def progress(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

        check = materials.true_trigger if strategy.oracle else materials.recovered
        members = [finetune(run.model, train, val, transform, budget, generator(p.seed, "unlearning-order", *draw),
                            generator(p.seed, "unlearning", name, *draw), progress, target=run.target, val_trigger=check)
                   for draw in [()] + [(k,) for k in range(1, args.soup)]]  # member 0: the single fine-tune's draws
        res = ensemble(run.model, members, val, check, run.target, args.blend)
        bar.close()
        model = _with_state(run, res.state)
        ev = run.evaluate(model)
        results[name] = res
        after[name] = {
            **ev.as_dict(), "oracle": strategy.oracle,
            **({"note": "UPPER BOUND: trained with the ground-truth trigger (breaks the threat model)"}
               if strategy.oracle else {}),
            "steps": res.steps, "steps_run": res.steps_run, "stopped_early": res.stopped_early,
            "blend": res.blend, "members": res.members,
            "val_accuracy": res.val_accuracy, "val_asr": res.val_asr,
            "recovered_trigger_flip_rate": (server_flip_rate(model, found.trigger, train.x, run.target)
                                            if found is not None else None),
            "seconds": round(res.seconds, 3),
        }
    oracle_names = [n for n in p.strategies if STRATEGIES[n].oracle]
    metrics = {
        "run": str(run.path), "checkpoint": run.checkpoint.name,
        "target_class": run.target, "source_class": run.source,
        "before": {**before.as_dict(), "val_accuracy": val_before},
        "after": after, "skipped": skipped,
        "trigger": trigger_info,
        "sanitized": {"strategy": p.sanitized,
                      "rule": "--sanitized" if args.sanitized else "first non-oracle strategy listed"},
        "oracle": bool(oracle_names), "oracle_strategies": oracle_names, "capture": capture_of(run),
        "asr_evaluation": "true trigger from the run config, test set (evaluation only, never used to train)",
        "hyperparams": {"steps": p.hp.steps, "lr": p.hp.lr, "momentum": p.hp.momentum,
                        "batch_size": p.hp.batch_size, "mix_ratio": p.hp.mix_ratio, "freeze_bn": p.hp.freeze_bn,
                        "max_accuracy_drop": p.hp.max_accuracy_drop, "clean_samples": len(train),
                        "val_samples": len(val), "val_is_train": val is train,
                        "val_fraction": args.val_fraction,
                        "checkpoint_rule": "latest within the accuracy budget on the validation images whose ASR "
                                           "with the strategy's trigger (recovered; true for the oracle) is lowest", "eval_every": args.eval_every,
                        "patience": args.patience, "distill": args.distill, "box_slack": p.box_slack,
                        "target_penalty": args.target_penalty, "penalty_margin": args.penalty_margin,
                        "refine_steps": p.refine_steps, "search_steps": p.search_steps, "layers": args.layers,
                        "soup": args.soup, "blend": args.blend, "seed": p.seed},
        "seconds": round(time.perf_counter() - start, 3),
    }
    # Everything is computed; now the writes (each atomic), models first, metrics last.
    for name, res in results.items():
        save_tensors(out / f"{name}.safetensors", res.state,
                     {"strategy": name, "oracle": str(STRATEGIES[name].oracle).lower(), "steps": str(res.steps)})
    save_tensors(out / "sanitized.safetensors", results[p.sanitized].state,
                 {"strategy": p.sanitized, "oracle": "false", "steps": str(results[p.sanitized].steps)})
    write_json(out / "metrics.json", metrics)
    _out(summary_table(metrics))
    _out(f"wrote {out} (sanitized.safetensors = {p.sanitized})")
    return 0


def _with_state(run: Run, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(run.model)
    model.load_state_dict(state)
    return model.eval()


def summary_table(m: dict[str, Any]) -> str:
    head = f"{'model':<30} {'accuracy':>8} {'asr':>6} {'source':>6} {'steps':>5}"
    lines = [head, "-" * len(head)]
    b = m["before"]
    lines.append(f"{'before':<30} {_fmt(b['accuracy'])} {_fmt(b['asr'], '6.3f')} {_fmt(b['source_accuracy'], '6.3f')} {'':>5}")
    for name, a in m["after"].items():
        label = f"{name} (ORACLE upper bound)" if a["oracle"] else name
        if name == m["sanitized"]["strategy"]:
            label += " *"
        lines.append(f"{label:<30} {_fmt(a['accuracy'])} {_fmt(a['asr'], '6.3f')} "
                     f"{_fmt(a['source_accuracy'], '6.3f')} {a['steps']:>5}{'  early stop' if a['stopped_early'] else ''}")
    t = m["trigger"]
    if t.get("found"):
        box = t["box"]
        score = t.get("scoring", {})
        lines.append(f"recovered trigger: {box['height']}x{box['width']} at ({box['top']}, {box['left']}), "
                     f"pattern mean {t['pattern_mean']}, from {len(t['used_reconstructions'])} reconstruction(s)"
                     + (f"; scoring only: IoU with the true box {score['box_iou']:.2f}" if score else ""))
    cap = m.get("capture") or {}
    lines.append(f"capture: {', '.join(cap.get('modes', []))}"
                 + (" -- UPPER BOUND (attackers picked by ground truth)" if cap.get("upper_bound") else ""))
    lines.append("asr: true trigger on the test set (evaluation only); * = sanitized.safetensors")
    return "\n".join(lines)
