"""The server's bound on what one client can do to theta: one rule, applied to every accepted reply of every mode.

A round's accepted replies become deltas Delta_k: a LoRA reply is its decoded upload; a zo-seeds reply is its
(seed, scalar) pairs replayed onto zero, Delta_k = -lr sum_s g_{k,s} z_s, after each scalar is clipped to
|g| <= c * the lower median over nodes of m_j, m_j = the smallest of node j's per-reply lower medians |g| in this
round and the last W - 1 rounds (the same one-entry-per-node window as the norm bound below). Then:

    weights     w_k = 1/K ("equal", the default), or w_k proportional to min(n_k, median_j n_j) ("examples"): a
                claimed example count never buys more weight than the round's median claim;
    norm bound  B_t = c * lower median over nodes of m_j, m_j = the smallest norm ||Delta_j|| node j sent in this
                round and the last W - 1 rounds (c = `norm_bound`, default 1; the node as the transport names it,
                Flower's src_node_id); every Delta_k is scaled to norm <= B_t. One reply then moves the weighted mean
                by at most w_k B_t however large it was sent, and while fewer than half of the nodes in the window are
                hostile, B_t is set by honest ones. One entry per node: a node that replies alone in consecutive
                rounds (the others dropped out, or --clients-per-round 1) meets its own earlier, smaller norm and
                cannot raise its own bound; only a node that is the window's only node (alone for W rounds in a row)
                sets it. Norms are kept as sent, so the bound follows honest updates up as well as down (one tiny
                reply does not freeze the model). Under client-level DP the bound is the fixed clip S instead
                (the accounting needs a bound that does not depend on other clients' data);
    aggregate   sum_k w_k Delta_k (--robust none; auto's choice for zo-seeds and client-level DP); or the
                coordinate-wise median of the Delta_k (--robust median); or (--robust direction, auto's choice for
                LoRA replies) sum_k w_k Delta_k over the Delta_k with cos(Delta_k, median) > 0 only: a dropped reply's
                weight is not handed to the others, so no reply weighs more than in the mean (a coalition that makes
                the median and gets honest replies dropped gains nothing); or (--robust trust, FLTrust) the mean of
                the Delta_k rescaled to the norm of the server's own update Delta_0 on its root data, each weighted by
                max(0, cos(Delta_k, Delta_0)) and never more than in the mean (`trusted`); with client-level DP
                (sum_k Delta_k) / K + N(0, (sigma S / K)^2) on the trained entries, K = --clients however many
                replies were accepted (McMahan et al. 2018's fixed denominator: a lost or rejected reply counts as a
                zero update, so whether one client's reply was accepted moves the sum by at most S, as the
                accountant assumes), released every round, even one with no accepted reply.

The server optimizer then post-processes the aggregate (server_opt.py), and a step whose result is non-finite or
outside fp16 range is not taken (strategy.py), so no accepted reply can lock out the rounds after it.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from slimtune.federated.model import is_trained

log = logging.getLogger("slimtune.federated")

WINDOW = 3  # rounds of norms (and zo-seeds scalars) the median is taken over


def lower_median(values: list[float]) -> float:
    """The lower median: with K values, the ceil(K/2)-th smallest, so fewer than half can move it past an honest one.
    No values (zo-seeds replies that hold no pair, in every round of the window): 0, a bound that lets nothing in."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[(len(ordered) - 1) // 2]


def update_norm(delta: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()


def clip_update(delta: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor] | None:
    """Delta scaled to L2 norm <= max_norm (unchanged if already within), after the scaling's rounding: the bound
    the client-level accounting assumes holds exactly, at a cost of at most three norm computations whatever the
    reply holds. The factor max_norm / norm and the products are taken in float64 and cast back once (in the delta's
    own dtype a reply of float32 values near 3e38 made the factor a float32 subnormal of a few bits, and shrinking it
    by one epsilon per pass took ~37k passes over the update for one reply). If the cast lands above the bound (a
    product rounded up, or results in the dtype's subnormal range), the scaling is redone with a 2^-40 margin and
    every entry rounded toward zero, so no entry exceeds its exactly scaled value. None if even that is measured
    above the bound (not observed): the caller rejects the reply."""
    norm = update_norm(delta)
    if norm <= max_norm:
        return dict(delta)
    factor = max(max_norm, 0.0) / norm  # a Python float: float64
    out = {k: (v.double() * factor).to(v.dtype) for k, v in delta.items()}
    if update_norm(out) <= max_norm:
        return out
    out = {k: _toward_zero(v.double() * (factor * (1 - 2.0**-40)), v.dtype) for k, v in delta.items()}
    return out if update_norm(out) <= max_norm else None


def _toward_zero(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values cast to `dtype` rounding toward zero: |result| <= |exact| entry by entry."""
    cast = exact.to(dtype)
    if dtype == torch.float64 or not cast.is_floating_point():
        return cast
    over = cast.double().abs() > exact.abs()
    return torch.where(over, torch.nextafter(cast, torch.zeros_like(cast)), cast)


class InfluenceBound:
    """Per-round bounds from the replies themselves: B_t for update norms, and the zo-seeds scalar clip. Each keeps,
    for the window's rounds, one value per node (the node as the transport names it)."""

    def __init__(self, multiple: float, window: int = WINDOW):
        self.multiple = multiple
        self.norms: deque[dict] = deque(maxlen=window)
        self.scalars: deque[dict] = deque(maxlen=window)

    @staticmethod
    def _cap(history: deque, values: list[float | None], nodes: list, multiple: float) -> float:
        """c x the lower median over nodes of each node's smallest value in the window (this round's and the last
        W - 1 rounds'). Values are stored as sent, so the bound rises with honest replies as it falls; a node counts
        once however many replies or rounds it sends, so a node alone in consecutive rounds meets its own smaller
        earlier value and cannot raise its own bound. A None value (a zo-seeds reply with no pair) adds nothing."""
        if len(values) != len(nodes):
            raise ValueError(f"{len(values)} values for {len(nodes)} nodes")
        current: dict = {}
        for node, value in zip(nodes, values):
            if value is not None:
                current[node] = min(value, current.get(node, value))
        history.append(current)
        smallest: dict = {}
        for round_values in history:
            for node, value in round_values.items():
                smallest[node] = min(value, smallest.get(node, value))
        return multiple * lower_median(list(smallest.values()))

    def scalar_cap(self, grads: list, nodes: list) -> float:
        """c x the lower median over nodes of their smallest per-reply lower median |g| in the window (zo-seeds)."""
        per_reply = [lower_median([abs(float(g)) for g in gs]) if len(gs) else None for gs in grads]
        return self._cap(self.scalars, per_reply, nodes, self.multiple)

    def bound_deltas(self, deltas: list[dict], nodes: list) -> tuple[list[dict | None], float]:
        """Every delta clipped to B_t; returns (clipped deltas, B_t). nodes[k]: the node delta k came from. A delta
        that cannot be brought within B_t is None (clip_update; the strategy rejects that reply)."""
        cap = self._cap(self.norms, [update_norm(d) for d in deltas], nodes, self.multiple)
        return [clip_update(d, cap) for d in deltas], cap


def coordinate_median(values: list[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median; with an even count K, the mean of the (K/2)-th and (K/2 + 1)-th values (torch's
    median is the lower one, which would push every coordinate down). Either middle value lies between honest ones
    while fewer than half of the K are hostile, so their mean does too."""
    ordered = torch.stack(values).sort(dim=0).values
    k = len(values)
    return ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> float:
    """cos(a, b) over the entries `names` (in double precision); 0 when either is the zero update."""
    norm_a, norm_b = update_norm(a), update_norm(b)
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return sum((a[n].double() * b[n].double()).sum() for n in names).item() / (norm_a * norm_b)


def agreeing(deltas: list[dict], theta: dict, cosines: list | None = None) -> list[bool]:
    """Which replies point the way the round does: cos(Delta_k, m) > 0, with m the coordinate-wise median of the
    round's (bounded) deltas. m is set by the honest majority, so a reply pushing against it (a sign flip, at any
    norm the bound lets in) is dropped, while honest replies from different data, which share the task's direction,
    are kept. m = 0 (no majority direction): none is kept. It tells a push against the round only when the honest
    replies share a direction: with K = 4 (8), synthetic replies of pairwise cosine rho, a sign-flipped reply is
    dropped always at rho >= 0.3 (0.2) and never at rho <= 0.1 (0.05); zeroth-order local training's replies (MeZO,
    zo-seeds: rho ~ 0.01) do not share one, and a flipped reply is kept there. One reply of 4 cannot make the median
    disagree with every honest one (the best such reply, a linear programme over the range it controls, leaves each
    honest cosine >= 0.3 even for orthogonal honest replies); it can get one weakly aligned honest reply dropped.

    Judging each reply against the median of the *other* replies instead (leave one out) drops a flipped reply at
    much lower rho, and was measured (benchmarks/federated_attacks.py, rows *-direction-loo): under label skew the
    others' median leans to the other label's clients, so it dropped half of the honest replies (56 of 120 kept
    in the all-honest run) and did worse against 2 sign-flipping clients of 8 (0.575 against this rule's 0.750);
    benchmarks/robust_rules.py shows the mechanism. `cosines`, when given, receives cos(Delta_k, m) per reply (the
    server's metrics.jsonl)."""
    reference = {name: coordinate_median([d[name] for d in deltas]) for name in theta}
    keep = []
    for d in deltas:
        cos = cosine(d, reference, theta)
        if cosines is not None:
            cosines.append(round(cos, 4))
        keep.append(cos > 0)
    return keep


def trusted(deltas: list[dict], reference: dict, theta: dict, weights: list[float],
            cosines: list | None = None) -> dict[str, torch.Tensor]:
    """FLTrust's aggregate (Cao et al., NDSS 2021) against the server's own update Delta_0 on its root data, with
    each reply's weight capped at its weight in the mean:

        ts_k = max(0, cos(Delta_k, Delta_0)),   a_k = min(w_k, w_k ts_k / sum_j w_j ts_j),
        update = sum_k a_k (||Delta_0|| / ||Delta_k||) Delta_k          (zero when every ts_k = 0)

    The reference is computed by the server from data no client holds, so no number of hostile replies can move it,
    unlike the round's median (`agreeing`): a reply pushing against the task (a sign flip) gets weight 0 however
    many replies push with it. Under label skew an honest update is its client's pull toward its labels plus the
    task's direction; the root data has both labels, so Delta_0 carries the task's direction and little of any one
    label's pull, and honest replies keep a positive cosine. Every reply is rescaled to ||Delta_0|| (in double
    precision: a reply sent at norm 1e-40 would overflow a float32 factor), so no norm it was sent at buys influence.
    FLTrust divides by sum_j ts_j alone; then a reply with cosine 1e-5, alone in a round whose honest replies point
    away from Delta_0, took the whole step ||Delta_0|| in a direction of its choosing. With the cap, one reply moves
    theta by at most w_k ||Delta_0|| (the mean's bound, with ||Delta_0|| for B_t), and a round whose trusted replies
    agree equally with Delta_0 keeps the mean's weights however small their cosines. `cosines`, when given,
    receives cos(Delta_k, Delta_0) per reply (unrounded)."""
    scale = update_norm(reference)
    ts = []
    for d in deltas:
        cos = cosine(d, reference, theta)
        if cosines is not None:
            cosines.append(cos)
        ts.append(max(cos, 0.0))
    total = sum(w * t for w, t in zip(weights, ts))
    update = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in theta.items()}
    if total > 0 and scale > 0:
        for d, w, t in zip(deltas, weights, ts):
            if t > 0:
                factor = min(w, w * t / total) * scale / update_norm(d)
                for name in theta:
                    update[name] += factor * d[name].double()
    return {name: update[name].to(value.dtype) for name, value in theta.items()}


def client_weights(claims: list[float | None], weighting: str) -> list[float]:
    """Normalised weights: equal, or each claimed example count capped at the round's median claim."""
    if not claims:
        return []
    if weighting == "equal":
        return [1.0 / len(claims)] * len(claims)
    cap = lower_median([float(c) for c in claims])
    capped = [min(float(c), cap) for c in claims]
    return [c / sum(capped) for c in capped]


def aggregate(theta: dict, deltas: list[dict], weights: list[float], cfg, noise=None, info: dict | None = None,
              reference: dict | None = None) -> dict:
    """The round's update from bounded deltas: weighted mean, coordinate-wise median, the agreeing or the trusted
    replies (`reference`: the server's own update on its root data, --robust trust), or (client-level DP) the
    sum over --clients (a lost reply counts as zero) plus Gaussian noise on what is trained. Under FFA, A's (zero)
    deltas are dropped and A gets no noise: it is never released changed, so noising it would only damage the model."""
    trained = lambda d: {k: (v if is_trained(k, cfg) else torch.zeros_like(v)) for k, v in d.items()}  # noqa: E731
    deltas = [trained(d) for d in deltas]
    rule = cfg.aggregation_rule
    if rule == "median":
        return {name: coordinate_median([d[name] for d in deltas]) for name in theta}
    if rule == "trust":
        if reference is None:
            raise ValueError("--robust trust needs the server's reference update (its root data)")
        reference = trained(reference)
        if info is not None:
            info["reference_norm"] = update_norm(reference)
        if not all(torch.isfinite(v).all() for v in reference.values()):
            log.warning("the server's reference update on --root-data is not finite (its training diverged: lower "
                        "--lr?); this round moves nothing")
            return {name: torch.zeros_like(value) for name, value in theta.items()}
        cosines: list = []
        update = trusted(deltas, reference, theta, weights, cosines)
        if info is not None:
            info["trusted"] = sum(c > 0 for c in cosines)  # replies with a positive trust score (metrics.jsonl)
            info["trust"] = [round(c, 4) for c in cosines]  # each reply's cosine with the reference, in reply order
        return update
    if rule == "direction":
        cosines: list = []
        keep = agreeing(deltas, theta, cosines)
        if info is not None:
            info["agreeing"] = sum(keep)  # replies kept by the direction filter (metrics.jsonl)
            info["agreement"] = cosines  # each reply's cosine with the round's median, in reply order
        # kept replies keep their weights; a dropped reply's weight goes to nobody (renormalising handed it to the
        # kept ones, so a coalition that got honest replies dropped gained weight)
        deltas, weights = [d for d, k in zip(deltas, keep) if k], [w for w, k in zip(weights, keep) if k]
        if not deltas:
            return {name: torch.zeros_like(value) for name, value in theta.items()}
    private = cfg.client_dp_clip > 0
    if private:  # the fixed denominator K = --clients (every client is asked every round): a lost reply counts as 0
        weights = [1.0 / cfg.num_clients] * len(deltas)
    update = {}
    for name, value in theta.items():
        noised = private and cfg.client_dp_noise > 0 and is_trained(name, cfg)
        total = torch.float64 if noised else value.dtype  # noised: summed and noised in float64, rounded once
        mean = sum((w * d[name].to(total) for w, d in zip(weights, deltas)), torch.zeros_like(value, dtype=total))
        if noised:  # (float32 noise on a float32 mean left outputs only an absent client could give: Mironov)
            std = cfg.client_dp_noise * cfg.client_dp_clip / cfg.num_clients
            if noise is None:  # a fresh secret key: the noise is never a function of a seed
                from slimtune.privacy.secret import KeyedNoise, RunKey
                noise = KeyedNoise(RunKey.fresh())
            mean = (mean + std * torch.from_numpy(noise.normal(tuple(value.shape)))).to(value.dtype)
        update[name] = mean
    return update
