"""The honest capture's SuspectBook at ResNet scale: memory and time of its histories.

    .venv/bin/python bench/suspect_book.py                       # d = 11.2M (ResNet-18), 20 clients, 3 rounds
    .venv/bin/python bench/suspect_book.py --d 200000 --json F   # any size; JSON to F

Feeds `rounds` rounds of `clients` flat updates of `d` float32 entries to a fresh
`server.suspects.SuspectBook` and reports the bytes its histories hold (against d floats per client
kept exactly), the process's peak RSS growth and the seconds per update. Above the book's
`exact_up_to` each history is a sign sketch; at or below it the exact sum is kept.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from server.suspects import SuspectBook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=11_200_000, help="parameters per update (default: ResNet-18's 11.2M)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    book = SuspectBook()
    update = torch.randn(args.d, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(args.rounds):
        book.observe_updates(dict.fromkeys(range(args.clients), update))
    seconds = (time.perf_counter() - start) / (args.rounds * args.clients)
    result = {
        "d": args.d, "clients": args.clients, "rounds": args.rounds,
        "sketched": args.d > book.exact_up_to,
        "history_mib": sum(h.numel() * h.element_size() for h in book.history.values()) / 2**20,
        "exact_mib": args.clients * args.d * 4 / 2**20,
        "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
        "ms_per_update": 1000 * seconds,
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
