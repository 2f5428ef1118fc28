"""Review 54: `slimtune report` and `slimtune generate` / `slimtune eval`, as a careless user and a privacy attacker.
Each test fails on the code it was written against (see the lead's report for the proposed fixes)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()
DEMO = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "demo"
TINY = ["--model", "tiny-llama"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def fake_run(root: Path, name: str, **fields) -> Path:
    """A finished run's files as train writes them (summary.json, metrics.jsonl, status.json)."""
    d = root / name
    d.mkdir(parents=True)
    summary = {"method": "dpzero", "peft": "lora", "model": "tiny-llama", "task": "sst2", "trainable_params": 1792,
               "peak_mem_mb": None, "time_per_step_s": None, "steps": 4, "final_accuracy": 0.5,
               "best_accuracy": 0.5, "best_eval_loss": 0.7, "epsilon": 2.0, "delta": 1e-5,
               "private_stats_logged": False, "bytes_communicated": 0, **fields}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_accuracy": 0.5, "eval_loss": 0.7}) + "\n"
                                             for s in (0, 2, 4)))
    (d / "status.json").write_text(json.dumps({"state": "completed", "step": 4}))
    return d


def _md_rows(out: Path) -> list[str]:
    return [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")][1:]


# --- report ---------------------------------------------------------------------------------------------------------

def test_report_marks_a_private_run_whose_logs_are_outside_the_guarantee(tmp_path):
    """--log-private-stats writes training loss, Poisson batch sizes and clipped fractions to metrics.jsonl (docs:
    'not covered by the guarantee ... marks it in the summary'). The report drops the mark: its table, Markdown,
    HTML and epsilon plot show 'epsilon 2.00' exactly as for a run that released nothing else, so a reader of the
    published report takes the run's files for (2, 1e-5)-DP."""
    plain = fake_run(tmp_path, "plain")
    logged = fake_run(tmp_path, "logged", private_stats_logged=True, peak_mem_mb=489.0, time_per_step_s=0.008)
    res = cli("report", plain, logged, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    plain_row, logged_row = _md_rows(tmp_path / "rep")
    eps = [i for i, h in enumerate((tmp_path / "rep" / "report.md").read_text().splitlines()[2].split("|"))
           if h.strip() == "epsilon"][0]
    assert plain_row.split("|")[eps] != logged_row.split("|")[eps] or \
        "private-stats" in (tmp_path / "rep" / "report.md").read_text(), logged_row


def test_report_says_which_task_each_run_was_scored_on(tmp_path):
    """Runs of different tasks land in one 'dev accuracy' / 'eval loss' column with nothing saying which task (or
    model) each number is on: an SST-2 accuracy ranked against an RTE one, a classification loss against a token
    cross-entropy."""
    a = fake_run(tmp_path, "a", task="sst2")
    b = fake_run(tmp_path, "b", task="rte", final_accuracy=0.9, best_accuracy=0.9)
    res = cli("report", a, b, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    rows = _md_rows(tmp_path / "rep")
    assert "sst2" in rows[0] and "rte" in rows[1], rows


def test_report_tells_runs_with_one_name_apart(tmp_path):
    """Two runs whose directories share a last component (sweep/a/run, sweep/b/run; or one run given twice) get the
    same name in the table, the legend of every plot and report.json: the report cannot be read."""
    a = fake_run(tmp_path / "a", "run", final_accuracy=0.5)
    b = fake_run(tmp_path / "b", "run", final_accuracy=0.9)
    res = cli("report", a, b, "--out", tmp_path / "rep")
    if res.exit_code == 2:  # refused with one line naming both: fine too
        assert "Traceback" not in res.output and "run" in res.output
        return
    names = [r.split("|")[1].strip() for r in _md_rows(tmp_path / "rep")]
    assert len(set(names)) == 2, names


def test_report_refuses_a_summary_that_is_not_a_slimtune_run(tmp_path):
    """A directory whose summary.json is some other tool's ({"accuracy": 0.93}) is reported as a run: a row of '-'
    with exit 0, instead of one line saying it is not a slimtune run."""
    d = tmp_path / "other"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"accuracy": 0.93, "f1": 0.9}))
    res = cli("report", d, "--out", tmp_path / "rep")
    assert res.exit_code == 2, res.output
    assert "summary.json" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "rep").exists()


def test_report_plots_follow_the_runs_tasks(tmp_path):
    """A classification run beside a generation run: the generation run's eval loss / BLEU curves are drawn only when
    no run has an accuracy, so it gets no curve at all; a generation-only report carries an empty 'Accuracy vs steps'
    plot."""
    cls = fake_run(tmp_path, "cls", epsilon=None, delta=None)
    gen = fake_run(tmp_path, "gen", task="generation", final_accuracy=None, best_accuracy=None, best_bleu=10.0,
                   epsilon=None, delta=None)
    (gen / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": 4.0 - s / 4, "eval_bleu": s})
                                               + "\n" for s in (0, 2, 4)))
    res = cli("report", cls, gen, "--out", tmp_path / "mixed")
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "mixed").glob("*.png")} & {"bleu_vs_steps.png", "loss_vs_steps.png"}
    res = cli("report", gen, "--out", tmp_path / "genonly")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "genonly" / "accuracy_vs_steps.png").exists()


def test_report_terminal_table_is_readable_at_100_columns(tmp_path):
    """print_summary promises to fit 100 columns; with a classification, a generation and a private run it shows
    14 columns and every number is cut to '0.5…', '1,7…', '1e-…'."""
    from rich.console import Console

    from slimtune.report import load_runs, print_summary
    runs = [fake_run(tmp_path, "dp"), fake_run(tmp_path, "zo", method="mezo", epsilon=None, delta=None,
                                               peak_mem_mb=488.0, time_per_step_s=0.008),
            fake_run(tmp_path, "gen", method="mezo", task="generation", final_accuracy=None, best_accuracy=None,
                     best_eval_loss=4.867, best_bleu=0.0, best_rougeL=3.5, epsilon=None, delta=None,
                     peak_mem_mb=514.0, time_per_step_s=0.024)]
    console = Console(width=100, record=True)
    print_summary([r.summary for r in load_runs([str(r) for r in runs])], console)
    text = console.export_text()
    assert "…" not in text, text


# --- generate / eval ------------------------------------------------------------------------------------------------

def test_generate_refuses_max_length_and_max_new_tokens_over_the_models_positions(tmp_path):
    """--max-length 200 --max-new-tokens 250 on a 256-position model: both given, they cannot both hold; generate
    keeps 6 prompt tokens (prompt_room) without a word and writes the whole prompt beside the completion, as if the
    model had seen it. The code's comment says 'a given one must fit'."""
    prompt = " ".join(["great movie fun"] * 100)
    res = cli("generate", *TINY, "--prompt", prompt, "--max-length", 200, "--max-new-tokens", 250,
              "--output", tmp_path / "o.jsonl")
    assert res.exit_code == 2, res.output
    assert "--max-length" in res.output and "--max-new-tokens" in res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_refuses_a_nul_byte_in_a_txt_prompt_file(tmp_path):
    """Tables refuse a NUL byte with file:line (a damaged file, or UTF-16 without its BOM); a .txt prompt file sends
    'hello\\x00there' to the model and writes it to --output."""
    f = tmp_path / "p.txt"
    f.write_bytes(b"hello\x00there\nok\n")
    res = cli("generate", *TINY, "--input", f, "--output", tmp_path / "o.jsonl", "--max-new-tokens", 2)
    assert res.exit_code == 2, res.output
    assert "p.txt:1" in res.output and "NUL" in res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_a_bare_carriage_return_does_not_split_a_prompt_line():
    """read_prompt_items says 'only \\n (and \\r\\n) end one [prompt]', but read_text's universal newlines turn a bare
    \\r into a line end: one line 'a\\rb' becomes two prompts (and every later line number shifts)."""
    import tempfile

    from slimtune import SlimtuneError
    from slimtune.generation.prompts import read_prompt_items
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "p.txt"
        f.write_bytes(b"first\rstill first\nsecond\n")
        try:
            items = read_prompt_items(str(f))
        except SlimtuneError as exc:  # refused, naming the line: fine too
            assert "p.txt:1" in str(exc)
            return
    assert items == ["first\rstill first", "second"], items


def test_generate_refuses_a_conversation_with_an_empty_turn(tmp_path):
    """--prompt '' and a row {"prompt": ""} are refused ('empty'); a conversation whose user turn is "" is rendered
    (an empty chat prompt) and generated from, exit 0."""
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "  "}]}) + "\n")
    res = cli("generate", *TINY, "--input", f, "--output", tmp_path / "o.jsonl", "--max-new-tokens", 2)
    assert res.exit_code == 2, res.output
    assert "chat.jsonl:1" in res.output and "messages[0]" in res.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def gen_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("r54") / "gen"
    res = cli("train", "--task", "generation", "--data", DEMO / "e2e_demo_train.csv", "--input-column", "mr",
              "--target-column", "ref", "--template", "Describe: {mr}\\nDescription:", *TINY, "--steps", "1",
              "--batch-size", "2", "--r", "2", "--eval-every", "0", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output
    return out / "adapter"


def test_eval_does_not_score_a_generation_adapter_as_a_classifier_without_a_word(gen_adapter):
    """An adapter that learned generation (its slimtune.json says so) evaluated with --task sst2 prints an SST-2
    accuracy, exit 0, with nothing saying the adapter never learned that task (a copied command, a wrong path)."""
    res = cli("eval", *TINY, "--adapter", gen_adapter, "--task", "sst2", "--data", DEMO / "sst2_demo_dev.tsv")
    assert res.exit_code == 2 or "generation" in res.stderr, res.output


def test_generate_error_is_the_only_line(gen_adapter):
    """--max-new-tokens over the model's positions with an adapter that learned a template: the 'note: prompts go
    through the template ...' line comes first, then the model is loaded, then the error: two lines, after work."""
    res = cli("generate", *TINY, "--adapter", gen_adapter, "--prompt", "name[x]", "--max-new-tokens", 10 ** 9)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --max-new-tokens"), res.stderr
