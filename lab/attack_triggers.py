"""The trigger each attack type plants and is evaluated with, by `attack.type`.

Always the full trigger: DBA's attackers stamp parts of `attack.trigger` and the server measures
ASR with all of it (Xie et al., ICLR 2020); Blended's is its full-image blend; A3FL starts each
round from `attack.trigger`; an edge-case backdoor's "trigger" is its held-out out-of-distribution
images. So the server's ASR evaluation (`lab.metrics.evaluate`) has no per-attack code.
"""

from __future__ import annotations

from collections.abc import Callable

from lab.config import AttackConfig
from lab.edge_case import edge_case_trigger
from lab.triggers import Trigger, blended_trigger, make_trigger

# attack.type -> its trigger builder (the default: attack.trigger as configured).
TRIGGERS: dict[str, Callable[[AttackConfig, int, int], Trigger]] = {
    "blended": lambda a, h, w: blended_trigger(h, w, a.blend_alpha),
    "edge-case": edge_case_trigger,
}


def trigger_for(attack: AttackConfig, height: int, width: int) -> Trigger:
    """The full trigger of `attack.type` on `height` x `width` images."""
    build = TRIGGERS.get(attack.type)
    return build(attack, height, width) if build is not None else make_trigger(attack.trigger, height, width)
