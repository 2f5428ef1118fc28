"""A round of local training, as a client runs it and as the server runs it on its own root data (--robust trust):
`local_steps` optimizer steps over batches of `batch_size` examples, from whatever LoRA state the model holds."""

from __future__ import annotations

from slimtune.data import EpochSampler, PoissonSampler
from slimtune.optim.base import mix_seed


def run_steps(cfg, model, objective, optimizer, examples, seed, private):
    """(losses, seeds, projected gradients) of cfg.local_steps steps. Private: Poisson batches from a fresh in-memory
    key (never the public seed), at a rate of at most B / --local-dp-min-examples (local_privacy.sample_rate); else
    epoch batches under `seed`."""
    if private:
        from slimtune.federated.local_privacy import sample_rate
        from slimtune.privacy.secret import RunKey
        sampler = PoissonSampler(len(examples), cfg.batch_size, key=RunKey.fresh(),
                                 max_rate=sample_rate(cfg, len(examples)))
    else:
        sampler = EpochSampler(len(examples), cfg.batch_size, seed)
    model.train(not optimizer.zeroth_order)
    losses, seeds, grads = [], [], []
    for step in range(cfg.local_steps):
        batch = objective.encode([examples[i] for i in sampler.indices(step)], cfg.max_length)
        if optimizer.zeroth_order:
            seeds.append(mix_seed(optimizer.config.seed, optimizer.step_count, 0))
        out = optimizer.step(lambda: objective.losses(model, batch))
        losses.append(out.loss)
        grads.append(out.info.get("projected_grad", 0.0))
    return losses, seeds, grads


def release_hooks(optimizer) -> None:
    """Opacus' per-example gradient hooks leave with the round's optimizer: the cached model gets a fresh privacy
    engine next round (it refused a second one: 'Trying to add hooks twice to the same model')."""
    module = getattr(optimizer, "grad_sample_module", None)
    if module is not None:
        module.remove_hooks()
        module.cleanup()
