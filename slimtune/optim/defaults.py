"""Per-method default hyper-parameters: one table, optimizer x PEFT -> lr, ZO eps, schedule, warm-up, steps.

A setting the user gives (flag, config file or Python field) always wins; what is left unset (None) is filled from
this table by `resolve`, and the resolved values are what the run prints and stores in config.json.

Where the numbers come from (SST-2, SmolLM2-135M, batch 16; selection on a 500-example split of *train*, never on
the dev set the results are reported on — see benchmarks/defaults_sweep.py and benchmarks/dpzero_clipping.py):
- MeZO/DPZero + LoRA: lr 1e-3, eps 1e-2. lr 2e-3 won the 200-step split runs (dpzero_clipping: MeZO 0.670; DPZero's
  adaptive clipping at 2x the 0.9 quantile matches it at epsilon 6 and 2) but diverged at ~step 350 of the 2,000-step
  defaults run; defaults_sweep mezo+lora runs 600 steps at a constant lr: 1e-3 learned steadily (0.600 -> 0.714 on
  the split, |projected grad| ~1 throughout).
- ZO + SVFit trains the relative scales (peft/svfit.py), which are O(1); lr from defaults_sweep (mezo+svfit).
- Full-parameter ZO: eps 1e-3 (MeZO's recipe). LOZO lr 1e-5 from defaults_sweep lozo+none (0.600 -> 0.674 on the
  split in 200 steps, against 0.610 at MeZO's 1e-6); MeZO full keeps the paper's 1e-6 (not swept).
- AdamW: LoRA 1e-3 from defaults_sweep adamw+lora (150 steps with 8 warm-up steps and linear decay: 0.870 on the
  split against 0.856 at 6e-4 and 0.832 at 3e-4, the earlier default; the glue_grid run in which 1e-3 collapsed to
  one class had no warm-up or decay). SVFit trains relative scales under every optimizer; AdamW lr 1e-2 from
  defaults_sweep adamw+svfit (0.820 on the split; 3e-2 peaked at 0.802 and ended at 0.772; the values themselves at
  2e-2: 0.732). Full fine-tuning 1e-5, PiSSA 1e-4 (PiSSA's own recipe scale: its adapter holds the principal
  components, so it moves the model faster than LoRA at the same lr).
- Schedules: linear decay (transformers' default) everywhere; backprop warms up over the first 5% of steps. Under ZO
  the decay makes late steps small, so the last model stays close to the best one.
- Steps: backprop 300, ZO 2,000 (ZO needs many more, cheaper, steps).
Entries not measured here use the family's value and say so in `source`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from slimtune import SlimtuneError
from slimtune.models.loading import builtin_architecture
from slimtune.optim.methods import METHOD_CONSTANTS, METHODS


@dataclass(frozen=True)
class MethodDefaults:
    lr: float
    eps: float | None  # ZO perturbation scale (None: first-order)
    lr_scheduler: str
    warmup_ratio: float
    steps: int
    source: str  # where the numbers come from
    extra: tuple = ()  # (OptimizerArgs field, value) pairs of method-specific settings (HiZOO's alpha, hybrid's fo_lr)

    def setting(self, name: str, fallback=None):
        return dict(self.extra).get(name, fallback)


FO_STEPS, ZO_STEPS = 300, 2000


def _fo(lr: float, source: str) -> MethodDefaults:
    return MethodDefaults(lr, None, "linear", 0.05, FO_STEPS, source)


def _zo(lr: float, eps: float, source: str) -> MethodDefaults:
    return MethodDefaults(lr, eps, "linear", 0.0, ZO_STEPS, source)


# (optimizer family, PEFT method) -> defaults. Families: the private variants share their base optimizer's entry
# (DPZero/DP-LOZO clip adaptively by default, see privacy/accountant.py; DP-AdamW/DP-SGD clip at a fixed C = 1),
# except where OWN (below) has the private method's own sweep.
TABLE: dict[tuple[str, str], MethodDefaults] = {
    ("adamw", "lora"): _fo(1e-3, "defaults_sweep adamw+lora (0.870 on the split; 6e-4: 0.856, 3e-4: 0.832)"),
    ("adamw", "pissa"): _fo(1e-4, "PiSSA recipe scale (not swept)"),
    ("adamw", "adapter"): _fo(3e-4, "LoRA's scale before defaults_sweep (not swept)"),
    ("adamw", "svfit"): _fo(1e-2, "defaults_sweep adamw+svfit (relative scales: 0.820 on the split)"),
    ("adamw", "none"): _fo(1e-5, "full fine-tuning recipe scale (not swept)"),
    ("sgd", "lora"): _fo(1e-2, "not swept"),
    ("sgd", "pissa"): _fo(3e-3, "not swept"),
    ("sgd", "adapter"): _fo(1e-2, "not swept"),
    ("sgd", "svfit"): _fo(1e-2, "not swept (relative scales: an SGD step on m moves s by lr S^2 g)"),
    ("sgd", "none"): _fo(1e-4, "not swept"),
    ("mezo", "lora"): _zo(1e-3, 1e-2, "defaults_sweep mezo+lora (600 steps; 2e-3 diverged at ~350)"),
    ("mezo", "pissa"): _zo(1e-4, 1e-2, "ZO+LoRA scaled to PiSSA's larger adapter (not swept)"),
    ("mezo", "adapter"): _zo(1e-3, 1e-2, "as mezo+lora (not swept)"),
    ("mezo", "svfit"): _zo(2e-3, 1e-2, "defaults_sweep mezo+svfit"),
    ("mezo", "none"): _zo(1e-6, 1e-3, "MeZO paper full-parameter recipe"),
    ("lozo", "lora"): _zo(1e-3, 1e-2, "as mezo+lora (not swept)"),
    ("lozo", "pissa"): _zo(1e-4, 1e-2, "as mezo+pissa (not swept)"),
    ("lozo", "adapter"): _zo(1e-3, 1e-2, "as mezo+lora (not swept)"),
    ("lozo", "svfit"): _zo(2e-3, 1e-2, "as mezo+svfit (not swept)"),
    ("lozo", "none"): _zo(1e-5, 1e-3, "defaults_sweep lozo+none (0.674 at 1e-5 vs 0.610 at 1e-6)"),
}
# FZOO divides its step by the loss spread (~ eps |grad|): lr chosen so a step moves LoRA weights about as far as
# MeZO's at lr 1e-3, eps 1e-2 with N = 8 (not swept).
for _peft, _lr in (("lora", 5e-5), ("pissa", 5e-6), ("adapter", 5e-5), ("svfit", 1e-4), ("none", 1e-7)):
    TABLE[("fzoo", _peft)] = _zo(_lr, 1e-2 if _peft != "none" else 1e-3, "scaled from mezo (not swept)")
# Issue 36's optimizers, none swept yet (benchmarks/defaults_sweep.py has their candidates):
# - HiZOO / HiZOO-L (zo/hizoo.py): H starts at 1 and grows at ~alpha kappa per step; kappa measured at the start on
#   SST-2 (SmolLM2, 6 batches of 16): 5..50 on LoRA (eps 1e-2), 15..2,300 on all 134M weights (eps 1e-3). alpha 1e-4
#   on LoRA lets H reach that scale within ~1,000 steps (the step shrinks by H as it grows, hence lr 2x MeZO's);
#   alpha 1e-6 on full weights (alpha kappa ~ 1e-3 per step). dphizoo shares hizoo's entry.
# - sparse-mezo (zo/sparse.py): perturbs 25% of each tensor (sparsity 0.75), a 4x smaller problem: lr 3x MeZO's on
#   full weights before its sweep, which chose 10x (below); the PEFT entries keep MeZO's (not swept).
# - hybrid (optim/hybrid.py): lr and eps are the ZO part's (MeZO's values), fo_lr the top blocks' AdamW lr (AdamW's
#   values; LoRA: 3x AdamW's, from defaults_sweep hybrid+lora), 2,000 steps as ZO. Warm-up: AdamW + LoRA's 15 steps
#   (0.75% of 2,000), not 5% of the ZO run's 2,000 (100): the top blocks learn at backprop's pace, and
#   defaults_sweep hybrid+lora-warmup ranked 15 first (80% on the split at step 120, against 160 for 100).
HYBRID_WARMUP = 15 / ZO_STEPS  # defaults_sweep hybrid+lora-warmup: AdamW's 15 warm-up steps
_MEZO_LR = {"lora": 1e-3, "pissa": 1e-4, "adapter": 1e-3, "svfit": 2e-3, "none": 1e-6}
_ADAMW_LR = {"lora": 1e-3, "pissa": 1e-4, "adapter": 3e-4, "svfit": 1e-2, "none": 1e-5}
for _peft, _lr in _MEZO_LR.items():
    _eps = 1e-3 if _peft == "none" else 1e-2
    _alpha = (("hessian_smooth", 1e-6 if _peft == "none" else 1e-4),)
    for _family in ("hizoo", "hizoo-l"):
        TABLE[(_family, _peft)] = MethodDefaults(2 * _lr, _eps, "linear", 0.0, ZO_STEPS,
                                                 "2x mezo's lr, alpha from measured curvature (not swept)", _alpha)
    TABLE[("sparse-mezo", _peft)] = _zo(3 * _lr if _peft == "none" else _lr, _eps,
                                        "mezo's lr, 3x on full weights (sparsity 0.75, not swept)")
    TABLE[("hybrid", _peft)] = MethodDefaults(_lr, _eps, "linear", HYBRID_WARMUP, ZO_STEPS,
                                              "mezo's lr and eps, adamw's lr on top, the lora warm-up (not swept)",
                                              (("fo_lr", _ADAMW_LR[_peft]),))
TABLE[("hybrid", "lora")] = MethodDefaults(
    1e-3, 1e-2, "linear", HYBRID_WARMUP, ZO_STEPS, "defaults_sweep hybrid+lora (600 steps, constant lr: fo_lr 3e-3 "
    "0.846 on the split, 1e-2 0.822, 1e-3 0.844, 3e-4 0.812; ZO lr 2e-3 ended at 0.742); defaults_sweep hybrid+lora-warmup "
    "(first 200 steps: warm-up 15 first at 80% on the split at step 120, 40 at 120 but 0.796 at 200 against 0.808, "
    "100 at 160)", (("fo_lr", 3e-3),))
TABLE[("sparse-mezo", "none")] = _zo(
    1e-5, 1e-3, "defaults_sweep sparse-mezo+none (600 steps, constant lr, pool z: 1e-5 0.676 on the split, 3e-6 0.640, "
    "1e-6 0.608)")
FAMILY = {name: method.family for name, method in METHODS.items()}  # a private method shares its base's entry
# A private method swept on its own: (optimizer, PEFT) -> its entry, before the family's. DP-AdamW + LoRA at
# AdamW's 1e-3 collapsed to the majority class on the split (the noise on 460,800 coordinates at batch 16 needs a
# larger step); selected at epsilon 6 with the split's Poisson sampler, 150 steps as the AdamW sweep.
OWN: dict[tuple[str, str], MethodDefaults] = {
    ("dp-adamw", "lora"): _fo(3e-3, "defaults_sweep dp-adamw+lora at epsilon 6 (0.804 on the split; 1e-2: 0.780, "
                                    "its best 0.802 at step 30; 1e-3: 0.655, the majority class)"),
    # the hybrid's lr, eps and fo_lr; its number of steps swept at epsilon 6, with the 5% warm-up (100 steps) it ran
    # with and keeps (the hybrid's warm-up sweep was not private: at 15 steps of warm-up the top blocks' first noised
    # steps would be taken at full lr, which has not been measured)
    ("dphybrid", "lora"): MethodDefaults(1e-3, 1e-2, "linear", 0.05, ZO_STEPS,
                                         "defaults_sweep dphybrid+lora at epsilon 6 (steps: 2,000 0.740 on the split, "
                                         "its budget spent at step 1,983 as steps redone after interruptions count "
                                         "twice; 600 0.685, 300 0.663)", (("fo_lr", 3e-3),)),
}

# Per-model corrections. The table above was measured on SmolLM2-135M; a model listed here had its ZO lr swept on its
# own (benchmarks/defaults_sweep.py). Gemma 3 270M: at SmolLM2's MeZO + LoRA lr 1e-3 both MeZO and DPZero diverged
# (|projected grad| up to ~100 against SmolLM2's ~2; dev 0.50 at step 250); the sweep gemma-mezo+lora (300 steps,
# constant lr, train split) gave 3e-5 0.606, 1e-4 0.672, 3e-4 0.788. The other ZO families (their lr is scaled from
# MeZO's) take the same ratio, unswept; FZOO normalises its step by the loss spread and keeps its value; first-order
# entries are unchanged (gemma-adamw-lora at AdamW's 1e-3: 0.908).
MODEL_ZO_LR = {"gemma3-270m": (1e-3, 3e-4, "defaults_sweep gemma-mezo+lora (300 steps: 3e-4 0.788 on the split, "
                                           "1e-4 0.672, 3e-5 0.606; 1e-3 diverged)")}


def defaults_for(optimizer: str, peft: str, model: str | None = None) -> MethodDefaults:
    """The table's entry for `optimizer` with `peft`; `model` (a built-in architecture's name, see
    models.loading.builtin_architecture) applies its correction (model_lr_scale)."""
    family = FAMILY.get(optimizer)
    key = (family, peft)
    if key not in TABLE:
        raise SlimtuneError(f"no default hyper-parameters for --optimizer {optimizer} with --peft {peft}")
    d = OWN.get((optimizer, peft), TABLE[key])
    scale = model_lr_scale(optimizer, model)
    if scale == 1.0:
        return d
    _, _, source = MODEL_ZO_LR[model]
    if (family, peft) != ("mezo", "lora"):  # the swept pair names its sweep; the others say they were scaled
        source = f"{d.source}; x{scale:g} on {model} as its mezo+lora ({source.split(' (')[0]})"
    return replace(d, lr=float(f"{d.lr * scale:.3g}"), source=source)


def model_lr_scale(optimizer: str, model: str | None) -> float:
    """The factor a built-in architecture's own sweep applies to `optimizer`'s lr: swept / SmolLM2's MeZO + LoRA lr
    for the ZO and hybrid methods except FZOO (its step is normalised by the loss spread), 1 otherwise. Used by
    `defaults_for` and by recipes with a base lr of their own (the federated clients' 1e-3, the demo's)."""
    method = METHODS.get(optimizer)
    if model not in MODEL_ZO_LR or method is None or method.kind == "first-order" or method.family == "fzoo":
        return 1.0
    base, swept, _ = MODEL_ZO_LR[model]
    return swept / base


def default_perturbation(optimizer: str) -> str:
    """Where z comes from unless --perturbation says: FZOO's Rademacher directions (its paper's), Gaussian elsewhere
    (an optimizer that draws no z records gaussian, as every run always has)."""
    method = METHODS.get(optimizer)
    return "rademacher" if method is not None and method.family == "fzoo" else "gaussian"


def method_settings(optimizer: str, peft: str, model: str | None = None) -> dict:
    """Every value `optimizer` reads beyond lr and eps, as used when not given: the table's entry (HiZOO's alpha,
    hybrid's fo_lr), else METHOD_CONSTANTS; and its direction source. The one place the CLI (resolve), the Python API
    and the registry's fallback (optim.build_optimizer) take them from, so config.json records what the run uses."""
    from slimtune.optim.builders import SETTING_USERS

    d = defaults_for(optimizer, peft, model)
    out = {name: d.setting(name, METHOD_CONSTANTS[name])
           for name, (_, users) in SETTING_USERS.items() if optimizer in users}
    out["perturbation"] = default_perturbation(optimizer)
    return out


def resolve(config) -> dict:
    """Fill a TrainConfig's unset (None) lr, eps, lr_scheduler, warmup_steps, steps and the method's own settings
    (`method_settings`) from the table, in place.
    Returns {setting: "default"|"given"} for the run's printout."""
    d = defaults_for(config.optimizer, config.peft.method, builtin_architecture(config.model))
    origin = {}
    for obj, name, value in ((config, "steps", d.steps), (config.optim, "lr", d.lr), (config.optim, "eps", d.eps),
                             (config, "lr_scheduler", d.lr_scheduler)):
        if name != "eps" or d.eps is not None:  # eps means nothing to a first-order run
            origin[name] = "given" if getattr(obj, name) is not None else "default"
        if getattr(obj, name) is None:
            setattr(obj, name, value)  # eps of a first-order run stays None (unused)
    if config.optimizer == "fzoo" and config.optim.n_spsa == 1:
        config.optim.n_spsa = 8  # FZOO's N one-sided directions (>= 2): recorded as trained, never 1
    origin["warmup_steps"] = "given" if config.warmup_steps is not None else "default"
    if config.warmup_steps is None:
        config.warmup_steps = int(d.warmup_ratio * config.steps)
    table_settings = dict(d.extra)  # origin is kept for the table's values only: the printout names those
    own = method_settings(config.optimizer, config.peft.method, builtin_architecture(config.model))
    for name, value in own.items():
        if name in table_settings:
            origin[name] = "given" if getattr(config.optim, name) is not None else "default"
        if getattr(config.optim, name) is None:
            setattr(config.optim, name, value)
    return origin


def describe(config, origin: dict) -> str:
    """One line: the hyper-parameters the run uses and which came from the table."""
    d = defaults_for(config.optimizer, config.peft.method, builtin_architecture(config.model))
    parts = [f"lr {config.optim.lr:g}"]
    if d.eps is not None:
        parts.append(f"eps {config.optim.eps:g}")
    parts += [f"{name.replace('_', ' ')} {getattr(config.optim, name):g}" for name, _ in d.extra]
    parts += [f"schedule {config.lr_scheduler}", f"warm-up {config.warmup_steps}", f"steps {config.steps}"]
    if config.privacy is not None:
        spec = config.privacy
        parts.append(f"clip {spec.clip:g} ({spec.clipping})")
    defaulted = [k for k, v in origin.items() if v == "default"]
    tail = f"; table defaults for {', '.join(defaulted)} ({d.source})" if defaulted else ""
    return f"{config.optimizer}+{config.peft.method}: " + ", ".join(parts) + tail
