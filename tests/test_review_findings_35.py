"""Review 35: an adversarial review of the day's changes (a generation adapter's learned prompt in eval and generate,
the per-row federated split, apply_peft's refusal of adapted models, merge in the run's dtype). Each test failed on
the code it was written against."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from test_bad_input_table import TINY, cli

ROOT = Path(__file__).resolve().parents[1]
E2E = str(ROOT / "slimtune" / "data" / "demo" / "e2e_demo_train.csv")
ROWS = [("what is two and two", "four"), ("the colour of the sky", "blue"), ("say hello", "hello"),
        ("say goodbye", "goodbye")]


def _prompts(path):
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def _train(root, header, *args):
    data = root / "qa.tsv"
    data.write_text(header + "".join(f"{q}\t{a}\n" for q, a in ROWS))
    out = root / "run"
    res = cli("train", "--task", "generation", "--data", data, *args, *TINY, "--steps", "2", "--batch-size", "2",
              "--quiet", "--eval-every", "0", "--out", out)
    assert res.exit_code == 0, res.output
    return data, out


@pytest.fixture(scope="module")
def prompt_column_run(tmp_path_factory):
    """A generation adapter trained on a table whose input column is called `prompt` (no `completion` column, so
    train reads it as a table and fills the template)."""
    return _train(tmp_path_factory.mktemp("promptcol"), "prompt\tanswer\n", "--input-column", "prompt",
                  "--target-column", "answer", "--template", "Q: {prompt} A:")


def test_generate_on_the_training_table_uses_the_learned_template_when_its_column_is_called_prompt(
        prompt_column_run, tmp_path):
    """`generate --adapter RUN/adapter --input qa.tsv` (the file the adapter trained on, input column `prompt`, template
    'Q: {prompt} A:'): prompts/_read takes any row with a `prompt` field as a WrittenPrompt when --input-column is left
    out, so the learned column's text is sent bare ('say hello'), while `eval --adapter` on the same file scores
    'Q: say hello A:' and `generate --prompt 'say hello'` wraps it. Same file, same adapter, another prompt, no
    note."""
    data, out = prompt_column_run
    pred = tmp_path / "e.jsonl"
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--target-column", "answer",
              "--max-new-tokens", "2", "--predictions", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "Q: what is two and two A:"  # eval: the learned template
    pred = tmp_path / "g.jsonl"
    res = cli("generate", *TINY, "--adapter", out / "adapter", "--input", data, "--max-new-tokens", "2",
              "--output", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "Q: what is two and two A:", _prompts(pred)


@pytest.fixture(scope="module")
def pair_column_run(tmp_path_factory):
    """A generation adapter trained on a table with `prompt` and `completion` columns named by --input-column /
    --target-column and a --template: train reads it as a table (the flags were given) and learns the template."""
    return _train(tmp_path_factory.mktemp("paircol"), "prompt\tcompletion\n", "--input-column", "prompt",
                  "--target-column", "completion", "--template", "Q: {prompt} A:")


def test_eval_scores_an_adapter_on_its_own_training_file_with_the_prompt_it_learned(pair_column_run, tmp_path):
    """`eval --adapter` with the training file and no flags: the record's input_column `prompt` and template fill
    the settings left out, but rows_to_examples decides 'prompt/completion pairs, used as they are' from
    `--input-column` not being *given* (GenerationTask.given), so the pairs are scored with the bare prompt, not the
    'Q: {prompt} A:' the adapter was trained on, without a word. (The same as before today's change, which read the
    first row in settings; the learned column now reaches the task but is not used.)"""
    data, out = pair_column_run
    pred = tmp_path / "e.jsonl"
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--max-new-tokens", "2",
              "--predictions", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "Q: what is two and two A:", _prompts(pred)


def _generation_cfg(**kw):
    from slimtune.federated import FederatedConfig
    return FederatedConfig(task="generation", data=E2E, input_column="mr", target_column="ref", model="tiny-llama",
                           out_dir="unused", **kw).resolved()


def test_federated_generation_on_the_bundled_demo_with_the_default_split_is_not_refused():
    """`slimtune federate --task generation --data e2e_demo_train.csv --input-column mr --target-column ref` with the
    default --clients 4 --alpha 0.5 --seed 0 (docs/how-to/federated.md: '--task generation with the data flags of
    train') is refused: 'the Dirichlet split ... (48 rows, seed 0) leaves client ... without rows'. Generation rows
    all have label 0, so the whole file is split by one Dir(0.5) vector over 4 clients, and with the redraw loop gone
    about half of all seeds (10 of seeds 0..19 here; 57% at 40 rows) leave a client empty. Before today's change the
    loop redrew until every client had rows, and this ran."""
    from slimtune.federated.config import check_inputs, check_partition
    cfg = _generation_cfg()
    rows = check_inputs(cfg)
    check_partition(cfg, *rows)  # seed 0, the default
    refused = 0
    for seed in range(20):
        try:
            check_partition(replace(cfg, seed=seed), *rows)
        except Exception:  # noqa: BLE001  (SlimtuneError: the refusal)
            refused += 1
    assert refused <= 2, f"{refused} of 20 seeds refused with the default --clients and --alpha"


def test_apply_peft_python_errors_name_the_method_argument_not_a_peft_keyword():
    """slimtune.apply_peft(model, "lora") on a model whose layers it cannot guess says 'peft lora: cannot guess
    target layers ...': in_python_terms turned the CLI's `--peft lora` into `peft lora`, but apply_peft has no `peft`
    keyword (it is `method`, the second argument), so the caller is pointed at a keyword that raises TypeError."""
    import torch

    import slimtune
    from slimtune import SlimtuneError

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.foo = torch.nn.Linear(4, 4)

    with pytest.raises(SlimtuneError) as info:
        slimtune.apply_peft(Plain(), "lora")
    assert "peft lora" not in str(info.value) and "method" in str(info.value), str(info.value)
