"""Byzantine attacks on the (n_clients, n_params) update matrix: pure torch, no Flower.

Each attack is a pure function `attack(benign, own, ...) -> (m, d)`: `benign` holds the honest
updates the adversary knows, `own` the m attackers' own honest updates (their row count is how
many malicious updates come out). The threat model (`attack.knowledge`) decides what `benign` is:

- `full`: a colluding adversary handed the round's benign updates (Fang et al. 2020's full
  knowledge). It runs as a server-side hook in simulation only (`byzantine.collusion.Colluder`):
  experiment harness, not part of the defense, which never learns which rows were replaced.
- `partial`: the attackers use only their own honest updates. In the lab's ClientApp an attacker
  has no channel to the others, so that is one update, its own (`client/attacks.py`).

Modules: alie (Baruch et al. 2019), ipm (Xie et al. 2019), fang (Trim and Krum attacks, Fang et
al. 2020), minmax (Min-Max and Min-Sum, Shejwalkar & Houmansadr 2021), registry (name -> attack),
collusion (the full-knowledge hook), schedule (which attackers act in a round).
"""
