"""Per-method defaults: unset hyper-parameters come from one table (optim/defaults.py), are printed and stored."""

import json

import pytest
from typer.testing import CliRunner

from slimtune import SlimtuneError
from slimtune.cli import app
from slimtune.optim import FO_OPTIMIZERS, HYBRID_OPTIMIZERS, ZO_OPTIMIZERS
from slimtune.optim.defaults import FAMILY, TABLE, defaults_for
from slimtune.peft.registry import PEFT_METHODS
from slimtune.optim.schedule import SCHEDULES

runner = CliRunner()


def test_every_optimizer_and_peft_pair_has_defaults():
    for optimizer in FO_OPTIMIZERS + ZO_OPTIMIZERS + HYBRID_OPTIMIZERS:
        for peft in PEFT_METHODS:
            d = defaults_for(optimizer, peft)
            assert d.lr > 0 and d.lr_scheduler in SCHEDULES and d.steps > 0 and d.source
            assert (d.eps is not None) == (optimizer not in FO_OPTIMIZERS)
    assert defaults_for("dpzero", "lora") == defaults_for("mezo", "lora")  # DP variants share their base's entry
    with pytest.raises(SlimtuneError, match="no default"):
        defaults_for("mezo", "prefix")
    assert len(TABLE) == len(set(FAMILY.values())) * len(PEFT_METHODS)
    assert defaults_for("dphizoo", "none") == defaults_for("hizoo", "none")
    assert defaults_for("hybrid", "pissa").setting("fo_lr") == defaults_for("adamw", "pissa").lr  # not swept
    assert defaults_for("hybrid", "lora").setting("fo_lr") == 3e-3  # defaults_sweep hybrid+lora's selection


def _train(tmp_path, demo_paths, name, *flags):
    res = runner.invoke(app, ["train", "--data", demo_paths[0], "--model", "tiny-llama", "--out",
                              str(tmp_path / name), "--quiet", "--peft", "lora", "--r", "2", "--batch-size", "8",
                              *flags])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split()), json.loads((tmp_path / name / "config.json").read_text())


def test_unset_hyperparameters_come_from_the_table_and_are_printed_and_stored(tmp_path, demo_paths):
    out, cfg = _train(tmp_path, demo_paths, "zo", "--optimizer", "mezo", "--steps", "2")
    d = defaults_for("mezo", "lora")
    assert (cfg["optim"]["lr"], cfg["optim"]["eps"], cfg["lr_scheduler"], cfg["warmup_steps"], cfg["steps"]) == \
        (d.lr, d.eps, d.lr_scheduler, 0, 2)
    assert f"lr {d.lr:g}" in out and f"eps {d.eps:g}" in out and "table defaults for lr, eps" in out
    out, cfg = _train(tmp_path, demo_paths, "fo", "--optimizer", "adamw", "--steps", "40", "--lr", "1e-3")
    d = defaults_for("adamw", "lora")
    assert (cfg["optim"]["lr"], cfg["lr_scheduler"], cfg["warmup_steps"]) == (1e-3, d.lr_scheduler, 2)  # 5% of 40
    assert "lr 0.001" in out and ", eps " not in out and "table defaults for lr_scheduler, warmup_steps" in out


def test_a_config_written_with_defaults_reproduces_them(tmp_path, demo_paths):
    _, first = _train(tmp_path, demo_paths, "a", "--optimizer", "mezo", "--steps", "2")
    out, again = _train(tmp_path, demo_paths, "b", "--config", str(tmp_path / "a" / "config.json"))
    assert {**first, "out_dir": None} == {**again, "out_dir": None}
    assert "table defaults" not in out  # every value came from the file


def test_a_model_with_its_own_sweep_gets_its_own_zo_lr():
    """Gemma 3 270M diverged at SmolLM2's MeZO + LoRA lr 1e-3 (benchmarks/results/defaults_diverged_gemma-*): a
    run on it with no --lr must take its own sweep's value, and every ZO family scaled from MeZO's lr follows."""
    smol = defaults_for("mezo", "lora")
    gemma = defaults_for("mezo", "lora", "gemma3-270m")
    assert smol.lr == 1e-3 and gemma.lr == 3e-4 and "gemma-mezo+lora" in gemma.source
    assert defaults_for("dpzero", "lora", "gemma3-270m").lr == 3e-4  # the private variant shares it
    assert defaults_for("mezo", "lora", "smollm2") == smol
    assert defaults_for("hizoo", "none", "gemma3-270m").lr == pytest.approx(0.3 * defaults_for("hizoo", "none").lr)
    assert defaults_for("hybrid", "lora", "gemma3-270m").setting("fo_lr") == 3e-3  # backprop part unchanged
    assert defaults_for("adamw", "lora", "gemma3-270m") == defaults_for("adamw", "lora")
    assert defaults_for("fzoo", "lora", "gemma3-270m") == defaults_for("fzoo", "lora")  # normalised step


def test_resolve_reads_the_model_and_a_given_lr_still_wins(tmp_path, demo_paths):
    from slimtune.api import train
    gemma = train(data=demo_paths[0], model="gemma3-270m", optimizer="mezo", peft="lora", out=str(tmp_path / "a"),
                  dry_run=True)
    assert gemma["optim"]["lr"] == 3e-4
    given = train(data=demo_paths[0], model="gemma3-270m", optimizer="mezo", peft="lora", lr=1e-3,
                  out=str(tmp_path / "b"), dry_run=True)
    assert given["optim"]["lr"] == 1e-3


def test_the_swept_defaults_are_the_sweeps_selections():
    """optim/defaults.py's per-model and per-method values that came from benchmarks/defaults_sweep.py equal what the
    committed sweep results selected (benchmarks/defaults.py refuses those rows otherwise)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import defaults as bench
    for name, (pair, optimizer, peft, model) in bench.SWEPT_DEFAULTS.items():
        assert defaults_for(optimizer, peft, model).lr == float(bench.swept_lr(pair)), name
        bench.check_swept_default(name)


def test_the_model_is_recognised_by_architecture_wherever_it_was_loaded_from(tmp_path, monkeypatch, tiny):
    """A Gemma 3 270M saved to a local directory, or passed to the Python API's optimizers, gets Gemma's defaults."""
    import slimtune
    from slimtune.models import loading

    checkpoint = tmp_path / "my-gemma"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 640,
                                                        "num_hidden_layers": 18, "vocab_size": 262144}))
    assert loading.builtin_architecture(str(checkpoint)) == "gemma3-270m"
    assert loading.builtin_architecture("gemma3-270m") == "gemma3-270m"
    assert loading.builtin_architecture(str(tmp_path)) is None and loading.builtin_architecture("tiny-llama") is None
    (checkpoint / "config.json").write_text("{not json")
    assert loading.builtin_architecture(str(checkpoint)) is None

    model = slimtune.apply_peft(tiny[0], "lora", r=2)
    assert slimtune.MeZO(model).settings["lr"] == 1e-3
    config = model.get_base_model().config
    monkeypatch.setitem(loading.ARCHITECTURES, "gemma3-270m", {"model_type": config.model_type,
                                                               "hidden_size": config.hidden_size})
    assert slimtune.MeZO(model).settings["lr"] == 3e-4  # the tiny model now has "Gemma's" signature
    assert slimtune.MeZO(model, lr=1e-3).settings["lr"] == 1e-3


def test_federated_zo_clients_on_a_model_with_its_own_zo_lr_take_its_ratio():
    """`slimtune federate --model gemma3-270m --local-optimizer mezo` ran clients at 1e-3, the lr that diverges on
    Gemma: the clients' lr left unset is 1e-3 times the model's own ZO correction."""
    from slimtune.federated import FederatedConfig
    assert FederatedConfig(model="gemma3-270m", local_optimizer="mezo").resolved().lr == 3e-4
    assert FederatedConfig(model="gemma3-270m", local_optimizer="dpzero").resolved().lr == 3e-4
    assert FederatedConfig(model="gemma3-270m", local_optimizer="adamw").resolved().lr == 1e-3
    assert FederatedConfig(model="tiny-llama", local_optimizer="mezo").resolved().lr == 1e-3
    assert FederatedConfig(model="gemma3-270m", local_optimizer="mezo", lr=1e-3).resolved().lr == 1e-3
    resolved = FederatedConfig(model="gemma3-270m", local_optimizer="mezo").resolved()
    assert json.loads(resolved.client_json())["lr"] == 3e-4  # what each client is sent


def test_a_private_method_swept_on_its_own_has_its_own_entry():
    """DP-AdamW + LoRA's lr came from its own sweep (AdamW's 1e-3 learned only the majority class under DP noise);
    DP-AdamW with other PEFT methods and DP-SGD still share their base's entry."""
    assert defaults_for("dp-adamw", "lora").lr == 3e-3 and "dp-adamw+lora" in defaults_for("dp-adamw", "lora").source
    assert defaults_for("adamw", "lora").lr == 1e-3
    assert defaults_for("dp-adamw", "svfit") == defaults_for("adamw", "svfit")
    assert defaults_for("dp-sgd", "lora") == defaults_for("sgd", "lora")


def test_a_run_config_reused_for_another_model_or_optimizer_takes_that_ones_table_defaults(tmp_path, demo_paths):
    """config.json stores resolved values: `--config RUN/config.json --model gemma3-270m` brought back the source
    run's table lr (SmolLM2's 1e-3, which diverges on Gemma) as if chosen. Values the source run took from the table
    follow the new model / optimizer; its own choices, flags and an unchanged combination are kept."""
    from slimtune.api import train
    _, first = _train(tmp_path, demo_paths, "a", "--optimizer", "mezo", "--steps", "2")
    source = str(tmp_path / "a" / "config.json")
    gemma = train(config=source, model="gemma3-270m", out=str(tmp_path / "g"), dry_run=True)
    assert (gemma["optim"]["lr"], gemma["steps"]) == (3e-4, 2)  # the table's lr for Gemma; steps were chosen
    given = train(config=source, model="gemma3-270m", lr=1e-3, out=str(tmp_path / "h"), dry_run=True)
    assert given["optim"]["lr"] == 1e-3
    again = train(config=source, out=str(tmp_path / "s"), dry_run=True)
    assert again["optim"] == first["optim"]  # same model, optimizer and PEFT: reproduced
    adamw = train(config=source, optimizer="adamw", out=str(tmp_path / "f"), dry_run=True)
    assert (adamw["optim"]["lr"], adamw["optim"]["eps"]) == (defaults_for("adamw", "lora").lr, None)
    res = runner.invoke(app, ["train", "--config", source, "--model", "gemma3-270m", "--out", str(tmp_path / "c"),
                              "--dry-run"])
    assert res.exit_code == 0 and "lr 0.0003" in " ".join(res.output.split()), res.output


def test_every_finished_or_cited_sweep_is_the_tables_value():
    """A class-level tie between benchmarks/results/defaults_sweep.json and optim/defaults.py: for every pair whose
    candidates have all run, or whose table entry cites that sweep, the table's lr (and eps, HiZOO's alpha, the
    hybrid's fo_lr where the candidates set them) is the selected candidate's. A sweep that finishes with another
    winner fails here until the table takes it; a table entry cannot cite a sweep it disagrees with."""
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from defaults_sweep import CANDIDATES
    sweep = json.loads((root / "benchmarks" / "results" / "defaults_sweep.json").read_text())

    def flag(flags, name):
        return flags[flags.index(name) + 1] if name in flags else None
    checked = []
    for pair, entry in sweep.items():
        flags = entry["candidates"][entry["selected"]]["flags"]
        d = defaults_for(flag(flags, "--optimizer"), flag(flags, "--peft"), flag(flags, "--model"))
        finished = set(CANDIDATES.get(pair, {})) <= set(entry["candidates"])
        if not finished and f"defaults_sweep {pair}" not in d.source:
            continue  # still running, and the table does not claim it
        checked.append(pair)
        assert d.lr == float(flag(flags, "--lr")), pair
        if flag(flags, "--eps") is not None and d.eps is not None:
            assert d.eps == float(flag(flags, "--eps")), pair
        extra = dict(d.extra)
        for name, key in (("--fo-lr", "fo_lr"), ("--hessian-smooth", "hessian_smooth")):
            if flag(flags, name) is not None:
                assert extra[key] == float(flag(flags, name)), (pair, key)
        swept = [c["flags"] for c in entry["candidates"].values()] + list(CANDIDATES.get(pair, {}).values())
        if len({flag(f, "--steps") for f in swept}) > 1:  # a sweep over the steps
            assert d.steps == int(flag(flags, "--steps")), (pair, "steps")
        if len({flag(f, "--warmup-steps") for f in swept}) > 1:  # a sweep over the warm-up (of the defaults' run)
            assert int(d.warmup_ratio * d.steps) == int(flag(flags, "--warmup-steps")), (pair, "warm-up")
    assert {"mezo+lora", "adamw+lora", "hybrid+lora", "dp-adamw+lora", "gemma-mezo+lora"} <= set(checked)
