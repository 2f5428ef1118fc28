"""`slimtune train` and `slimtune demo`."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from slimtune import SlimtuneError
from slimtune.settings.cli import command, file_values
from slimtune.settings.commands import DemoSettings
from slimtune.settings.train import TrainSettings, from_run_config

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"


def register(app) -> None:
    command(app, TrainSettings, run_train, prepare=resumed_settings,
            help="Fine-tune a causal LM on labelled text or prompt/completion pairs; writes metrics.jsonl, "
                 "summary.json, checkpoint/ and adapter/.")
    command(app, DemoSettings, run_demo, with_config=False)


def resumed_settings(values: dict, ctx, config_path: str | None):
    """--resume: (base, given, origin): the run's config.json is the base (settings not given keep the run's values,
    and a message about one names that file); then the config file,
    then the flags (settings/cli.py build_settings). ctx None: `values` are a Python caller's keyword arguments
    (slimtune.train), each one given."""
    from click.core import ParameterSource

    def chosen(name):  # command line (or keyword) first, then the config file, then the default
        if name in values and (ctx is None or ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE):
            return values[name]
        if config_path:
            fv, _ = file_values(TrainSettings, config_path)
            if name in fv:
                return fv[name]
        return values[name] if name in values else TrainSettings.defaults()[name]

    if not chosen("resume"):
        return None, None, None
    from slimtune.train.resume import read_stored
    out = chosen("out")
    given_out = "out" in values and (ctx is None or ctx.get_parameter_source("out") == ParameterSource.COMMANDLINE)
    record_dir = Path(config_path).resolve().parent if config_path else None
    from slimtune.train.run_dir import is_run_directory
    if (record_dir is not None and not given_out and is_run_directory(record_dir)
            and record_dir != Path(out).resolve()):  # a copied or moved run's own record names where it was made
        raise SlimtuneError(f"--config {config_path}: a run's record naming out {out!r}, another directory: --resume "
                            f"would continue the run there, not the one in {Path(config_path).parent}; give --out")
    stored = read_stored(Path(out))
    if stored is None:
        raise SlimtuneError(f"{'--resume' if ctx is not None else 'slimtune.train: resume=True:'} {out}: no run "
                            "there (no config.json)")
    record = str(Path(out) / "config.json")
    return from_run_config(stored, record), set(), record  # messages name the record


def run_train(s: TrainSettings):
    from slimtune.cli import console, fail
    from slimtune.optim.defaults import describe, resolve
    from slimtune.train import prepare, train
    from slimtune.train.trainer import TrainingInterrupted, _stop_on_interrupt, stopped_message

    config = None
    try:
        with _stop_on_interrupt(defer_first=False):  # SIGTERM/SIGHUP while loading; train() handles them after
            config = s.to_config()
            if s.dry_run:
                dry_run(s, config)
                return
            run = prepare(config, resume=s.resume, restart=s.restart)
            main = run.world.main  # under torchrun only rank 0 reports (the others hold no summary)
            if main:
                console.print(f"hyper-parameters: {describe(config, run.defaults_origin)}", highlight=False,
                              markup=False)
            summary = train(run)
    except TrainingInterrupted as exc:
        fail(exc, exc.code)
    except KeyboardInterrupt as exc:  # loading, the final saves, a second Ctrl-C, SIGTERM: one line, resumable
        fail(stopped_message(config.out_dir if config is not None else None, exc), 128 + getattr(exc, "signum", 2))
    except SlimtuneError as exc:
        fail(exc)
    if not main:
        return
    from slimtune.report import print_summary
    print_summary([summary], console)
    console.print(f"run written to [bold]{escape(str(config.out_dir))}[/] (summary.json, metrics.jsonl, adapter/)")


def checked_dry_run(s: TrainSettings, config) -> dict:
    """What a dry run checks, for the command line and the Python API alike: the defaults resolved (returns where
    each came from), the settings validated, the output directory and, for --resume, the run it continues, all without
    loading anything."""
    from slimtune.optim.defaults import resolve
    from slimtune.train.resume import check_resume
    from slimtune.train.run_dir import check_output_dir
    from slimtune.train.trainer import validate

    origin = resolve(config)
    validate(config)
    check_output_dir(Path(config.out_dir), "--out")
    if s.resume:
        check_resume(config, Path(config.out_dir))
    return origin


def dry_run(s: TrainSettings, config) -> None:
    """Resolve the defaults and check what can be checked without loading anything; print the settings."""
    import json
    from dataclasses import asdict

    from slimtune.cli import console
    from slimtune.optim.defaults import describe

    origin = checked_dry_run(s, config)
    console.print(f"hyper-parameters: {describe(config, origin)}", highlight=False, markup=False)
    console.print_json(json.dumps(asdict(config), default=str))


def run_demo(s: DemoSettings):
    """Fine-tune the embedded SmolLM2 with ZO (MeZO) + LoRA and with AdamW + LoRA on the bundled demo set, then
    write and print the report."""
    from slimtune.cli import console, fail
    from slimtune.commands.report import make_report
    from slimtune.models.loading import builtin_architecture
    from slimtune.optim.defaults import model_lr_scale

    common = dict(data=str(DEMO_DIR / "sst2_demo_train.tsv"), eval_data=str(DEMO_DIR / "sst2_demo_dev.tsv"),
                  model=s.model, peft="lora", steps=s.steps, batch_size=16, eval_every=max(s.steps // 3, 1))
    # the demo's MeZO lr suits SmolLM2; a model with its own ZO lr (gemma3-270m) takes the same ratio, as the table
    zo_lr = float(f"{5e-3 * model_lr_scale('mezo', builtin_architecture(s.model)):.3g}")
    try:
        runs = []
        for name, title, extra in (("zo-lora", "zeroth-order (MeZO) + LoRA", dict(optimizer="mezo", lr=zo_lr,
                                                                                    eps=1e-2)),
                                   ("fo-lora", "first-order (AdamW) + LoRA, for comparison",
                                    dict(optimizer="adamw"))):  # the adamw+lora defaults
            console.rule(title)
            settings = TrainSettings.build({**common, **extra, "out": f"{s.out}/{name}"})
            run_train(settings)
            runs.append(f"{s.out}/{name}")
        make_report(runs, f"{s.out}/report")
    except SlimtuneError as exc:
        fail(exc)
