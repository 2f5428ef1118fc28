"""MeZO: memory-efficient ZO-SGD (Malladi et al., 2023).

The seed trick: a step only stores an integer seed; z is regenerated from it whenever needed, chunk by chunk into a
small reusable buffer, and added to the weights in place. One step makes three sweeps over the trainable weights:
+eps z, -2 eps z, then restore-and-update fused as p += eps z; p *= (1 - lr wd); p -= lr g z (the naive version makes
four and holds weight-sized temporaries).

Restore exactness (fp32): (theta + eps z) - 2 eps z + eps z is not bit-identical in floating point; each element
drifts by at most a few ulp of |theta| + 2 eps |z| (tests bound it by 4 ulp). bf16 / fp16 weights (`--dtype bf16`)
take slimtune/zo/precision.py's sweeps instead: every perturbed state is one rounding away from theta, theta is
recovered exactly (except where a perturbation crossed into a coarser binade: within one ulp there), and the update is
rounded stochastically (unbiased), with its random bits from the step seed; z is drawn in the weights' dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from slimtune import SlimtuneError
from slimtune.optim.base import SlimOptimizer, StepOutput, decays, deferred_interrupt, mix_seed, trainable
from slimtune.zo import precision
from slimtune.zo.estimators import MeanDifference
from slimtune.zo.perturbation import make_source


@dataclass
class MeZOConfig:
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_spsa: int = 1  # perturbations averaged per step
    seed: int = 0
    chunk_size: int | None = None  # elements of z generated at once (bounds the temporary memory); None: by device
    # (default_chunk_size)
    perturbation: str = "gaussian"  # gaussian, rademacher or pool (zo/perturbation.py)
    pool_size: int | None = None  # pool: Gaussian values kept per (device, dtype); None: 4 Mi, or 4 chunks if more


CPU_CHUNK, CUDA_CHUNK = 1 << 20, 1 << 24


def default_chunk_size(device) -> int:
    """Elements of z per chunk when none is given: 1 Mi on CPU (a few MB, cache-friendly), 16 Mi on a GPU, where each
    chunk costs a handful of kernel launches (1 Mi chunks made a 7B-shaped bf16 MeZO step on an H200 20x two forwards:
    ~20k chunks a step, launch-bound); the buffers stay small beside the weights (16 Mi bf16 + its fp32 work: 160 MB)."""
    return CUDA_CHUNK if torch.device(device).type == "cuda" else CPU_CHUNK


class ZOOptimizer(SlimOptimizer):
    """Two-sided SPSA with the seed trick. Subclasses define the direction z via `_sweep`."""

    zeroth_order = True

    def __init__(self, named_params, config, estimator=None):
        self.config = config
        self.params = [(n, p, decays(n, p)) for n, p in trainable(named_params)]
        if not self.params:
            raise ValueError("no trainable parameters to optimize")
        self.estimator = estimator or MeanDifference()
        self.step_count = 0
        if config.chunk_size is None:
            config.chunk_size = default_chunk_size(self.params[0][1].device)
        self.source = make_source(getattr(config, "perturbation", "gaussian"), config.seed,
                                  getattr(config, "pool_size", None) or max(1 << 22, 4 * config.chunk_size))
        precision.warn_if_eps_rounds_away([p for _, p, _ in self.params], config.eps)

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self, closure) -> StepOutput:
        """One step (`_step`, each method's own), all or nothing where it can be:

        - Before the update (the closure's calls and the sweeps that perturb and restore theta): an exception (the
          closure ran out of memory or was refused by a caller's check, Ctrl-C) puts theta back first, within the few
          ulp of any restore, and the estimators' states (adaptive clipping's C) return to the step's start: nothing
          of the failed step remains, and the same step can be taken again.
        - Ctrl-C never cuts a sweep over the weights: it is held until the sweep ends (`deferred_interrupt`), and
          during the update until the update ends; the step is then complete, and counted, when KeyboardInterrupt
          leaves it.
        - From the update on (`_updating`) the step counts as taken: its releases are going into the weights, and a
          private run's accountant prices them whatever happens next. Any other failure there, or inside a sweep,
          leaves weights that no sweep can put back exactly: the optimizer then refuses further steps."""
        if self._broken:
            raise SlimtuneError(self._broken)
        if self._owner is not None and not self._owner_stepping:
            raise SlimtuneError(f"{self._owner}: step through the optimizer itself (opt.step, not opt.impl.step): the "
                                "inner step has none of its private checks (the drawn batch, the budget, the count "
                                "of what its key released)")
        self._owner_stepping = False  # spent on entry: a closure calling opt.impl.step is refused too
        saved = [obj.state_dict() for obj in self._stateful()]
        self._committed = self._updated = self._sweeping = False
        try:
            return self._step(closure)
        except BaseException as exc:
            try:
                if not (self._sweeping or self._committed):
                    try:
                        self._abort_step(saved)
                    except BaseException as undo:
                        if self._sweeping:  # the sweep putting theta back failed too: it is partly undone
                            self._fail(undo)
                        raise  # (a Ctrl-C held by that sweep leaves after it ended whole: theta is back)
                if self._sweeping or (self._committed and not self._updated):
                    self._fail(exc)
                raise
            finally:  # whichever way it failed: nothing of the step's batch stays beside the weights
                self._after_failed_step()

    def _fail(self, exc: BaseException) -> None:
        """Refuse further steps: the weights were left part-way through a sweep or an update (see `step`)."""
        self._drop_transients()
        self._broken = (f"slimtune: a {self.name} step failed part-way through "
                        f"{'its update' if self._committed else 'a sweep over the weights'} ({type(exc).__name__}); "
                        "the trainable weights may be partly perturbed or updated: reload them from a checkpoint and "
                        "build a new optimizer")

    _broken: str | None = None
    _owner: str | None = None  # a private `slimtune.DPZero`-like wrapper whose step() must be the way in
    _owner_stepping = False

    def _drop_transients(self) -> None:
        """After a failure that leaves the weights partly moved: drop what is not in the weights (LOZO's forward
        shift), so that the model's forward is at least its weights'."""

    def _after_failed_step(self) -> None:
        """After any failed step (undone or not): drop what the step computed from its batch beside the weights (the
        hybrid's top gradients and Opacus' per-example state). Nothing here for forward-only methods."""

    def _stateful(self) -> list:
        """The objects whose state a step moves before its update (private estimators' adaptive clips)."""
        estimator = getattr(self, "estimator", None)
        return [estimator] if estimator is not None else []

    def _abort_step(self, saved: list[dict]) -> None:
        """Undo what a step that raised before its update had done: theta + offset z of the seed last applied goes back
        to theta (within the few ulp of any restore), and the estimators' states are the saved ones."""
        for obj, state in zip(self._stateful(), saved):  # first: a Ctrl-C held by the sweep below ends the abort
            obj.load_state_dict(state)
        offset = getattr(self, "_offset", 0.0)
        if offset:
            self._perturb(self._perturbed_seed, -offset)

    @contextmanager
    def _updating(self):
        """The step's update. From here the step counts as taken (step_count advances first), Ctrl-C waits for the
        update to end, and a failure inside it leaves the optimizer refusing further steps (see `step`)."""
        self.step_count += 1
        self._committed = True
        with deferred_interrupt():
            yield
            self._updated = True

    def _step(self, closure) -> StepOutput:
        """n-SPSA: n two-sided estimates at the same theta, then one update with their mean, g = (1/n) sum_i g_i z_i."""
        eps, n = self.config.eps, self.config.n_spsa
        self._begin_step()
        estimates, losses, infos = [], [], []
        for i in range(n):
            seed = mix_seed(self.config.seed, self.step_count, i)
            lp = self._measure(closure, seed, eps)
            lm = self._measure(closure, seed, -2 * eps)
            g, info = self.estimator(lp, lm, eps)
            infos.append(info)
            losses.append(((lp.float().mean() + lm.float().mean()) / 2).item() if lp.numel() else float("nan"))
            estimates.append((seed, g))
            if n > 1:
                self._perturb(seed, eps)  # back to theta for the next estimate
        with self._updating():
            if n == 1:
                self._sweep(seed, "restore_update", eps=eps, coef=g, decay=True, last=True)
            else:
                for i, (seed_i, g_i) in enumerate(estimates):
                    self._sweep(seed_i, "update", coef=g_i / n, decay=i == 0, last=i == n - 1)
            getattr(self.estimator, "end_step", lambda: None)()  # a private estimator's noise moves to the next step
        info = infos[0] if n == 1 else {k: sum(d[k] for d in infos) / n for k in infos[0]}  # averaged over estimates
        return StepOutput(sum(losses) / n, {"projected_grad": sum(g for _, g in estimates) / n, **info})

    def _perturb(self, seed: int, alpha: float) -> None:
        """theta += alpha z(seed), whole (Ctrl-C waits for the sweep to end); `_abort_step` removes what is applied
        when a step raises."""
        self._perturbed_seed = seed
        self._sweeping = True
        with deferred_interrupt():
            self._sweep(seed, "add", alpha=alpha)
            self._sweeping = False

    def _measure(self, closure, seed: int, alpha: float) -> torch.Tensor:
        self._perturb(seed, alpha)
        with torch.inference_mode():
            return closure().detach()

    @property
    def forwards_per_step(self) -> int:
        """Closure calls (forward passes over the batch) one step makes: two per SPSA estimate."""
        return 2 * self.config.n_spsa

    def _begin_step(self) -> None:
        """Hook run before a step's first perturbation (LOZO resamples V here)."""

    # -- the direction z ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sweep(self, seed: int, op: str, alpha: float = 0.0, eps: float = 0.0, coef: float = 0.0,
               decay: bool = False, last: bool = True) -> None:
        """One pass over the weights regenerating z from `seed`.

        op "add": p += alpha z. op "update": p *= (1 - lr wd) if decay; p -= lr coef z.
        op "restore_update": p += eps z, then "update" (the fused last sweep of a step).
        `last` marks the step's final update sweep (optimizers with state, e.g. LOZO-M, apply it once there).
        """
        lr, wd = self.config.lr, self.config.weight_decay
        chunk = self.config.chunk_size
        generators: dict = {}
        offset, new_offset = self._begin_sweep(op, alpha)
        for index, (name, p, p_decays) in enumerate(self.params):
            gen = generators.get(p.device)
            if gen is None:
                gen = generators[p.device] = self.source.generator(seed, p.device)
            buf = self._buffer(p, chunk)
            flat = p.data.view(-1)
            low = precision.is_low_precision(p)
            for start in range(0, flat.numel(), chunk):
                part = flat[start:start + chunk]
                z, sign = self.source.draw(gen, buf, part.numel())
                z = self._direction(index, start, z)
                if low:  # bf16 / fp16: one rounding from theta, stochastic rounding of the update (precision.py)
                    self._low_precision_chunk(seed, part, z, sign, op, offset, new_offset, coef,
                                              decay and p_decays and wd)
                    continue
                if op == "add":
                    part.add_(z, alpha=alpha * sign)
                    continue
                if op == "restore_update":
                    part.add_(z, alpha=eps * sign)
                if decay and p_decays and wd:
                    part.mul_(1 - lr * wd)
                part.add_(z, alpha=-lr * coef * sign)
        self._offset = new_offset

    def _begin_sweep(self, op: str, alpha: float) -> tuple[float, float]:
        """(offset before, offset after): the multiple of z the weights hold, i.e. rd(theta + offset z) in 16-bit
        weights ("add" moves it by alpha; "restore_update" and "update" end at theta)."""
        offset = getattr(self, "_offset", 0.0)
        if op == "update" and offset:
            raise RuntimeError("ZO: an update sweep while a perturbation is applied")
        if op != "add":
            return offset, 0.0
        new = offset + alpha
        return offset, (0.0 if abs(new) <= 1e-9 * abs(alpha) else new)  # +eps, -2 eps, +eps returns exactly to 0

    def _low_precision_chunk(self, seed: int, part, z, sign: float, op: str, offset: float, new_offset: float,
                             coef: float, decays_here: bool) -> None:
        scratch = self.__dict__.setdefault("_scratch", precision.Scratch())
        if op == "add":
            precision.move_(part, z, offset * sign, new_offset * sign, scratch)
            return
        gen = self.__dict__.setdefault("_rounding", precision.RoundingStreams()).get(seed, part.device)
        lr = self.config.lr
        decay = 1 - lr * self.config.weight_decay if decays_here else 1.0
        precision.update_(part, z, offset * sign, decay, -lr * coef * sign, gen, scratch)

    def _direction(self, index: int, start: int, z: torch.Tensor) -> torch.Tensor:
        """The direction's values for elements start.. of parameter `index`, given the drawn z there (a view that
        must not be written: it may be the pool). Sparse MeZO masks it here; MeZO uses z as drawn."""
        return z

    def _buffer(self, p: torch.Tensor, chunk: int) -> torch.Tensor:
        """One reusable z buffer per (device, dtype), as large as the biggest chunk it must hold."""
        key = (p.device, p.dtype)
        buffers = self.__dict__.setdefault("_buffers", {})
        if key not in buffers:
            largest = max(q.numel() for _, q, _ in self.params if (q.device, q.dtype) == key)
            buffers[key] = torch.empty(min(chunk, largest), device=p.device, dtype=p.dtype)
        return buffers[key]

    def set_lr(self, lr: float) -> None:
        self.config.lr = lr

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.estimator.load_state_dict(state.get("estimator", {}))


class MeZO(ZOOptimizer):
    """ZO-SGD with dense Gaussian z over all trainable parameters."""

    name = "mezo"
