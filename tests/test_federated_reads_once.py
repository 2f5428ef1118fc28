"""A simulated client and the server read the shared --data file once each: the rows a client trains on and the rows
its split indexes are one reading (a file rewritten between two readings gave a split over other rows, or an index
past the training examples). Fails on the code before the fix (build_model, then partition_rows over a second
reading; coalition_data a third)."""

from dataclasses import replace

from slimtune.train import objectives
from test_federated import make_cfg  # noqa: F401


def _count_loads(monkeypatch, path):
    seen = []
    for cls in (objectives.ClassificationObjective, objectives.GenerationObjective):
        real = cls.load

        def load(self, source, split, _real=real):
            if str(source) == str(path):
                seen.append(split)
            return _real(self, source, split)
        monkeypatch.setattr(cls, "load", load)
    return seen


def test_a_simulated_client_reads_the_shared_file_once(demo_paths, monkeypatch):
    from slimtune.federated import client_app
    cfg = make_cfg(demo_paths)
    seen = _count_loads(monkeypatch, cfg.data)
    client_app._setup.cache_clear()
    model, tok, train, parts, objective = client_app._setup(cfg.to_json(), cfg.num_clients)
    assert seen == ["train"], seen
    assert sorted(i for p in parts for i in p) == list(range(len(train)))


def test_the_server_reads_the_shared_file_once_for_the_model_and_the_coalition(demo_paths, monkeypatch):
    from slimtune.federated.attacks import coalition_data
    from slimtune.federated.model import build_model_and_split
    cfg = make_cfg(demo_paths, attack_coalition=1)
    seen = _count_loads(monkeypatch, cfg.data)
    model, tok, train, evals, objective, split = build_model_and_split(replace(cfg, eval_data=""))
    pooled = coalition_data(cfg, train, split)
    assert seen == ["train"], seen
    assert 0 < len(pooled) < len(train)
