"""A generation adapter records the prompt it learned (task, template, input column), as a classification adapter
does: `eval --adapter` scores it with that template when --template is left out (it scored with the bare input
column, another prompt than the one trained, without a word), and merge carries the record on."""

import json

import pytest

from test_bad_input_table import TINY, cli

ROWS = [("what is two and two", "four"), ("the colour of the sky", "blue"), ("say hello", "hello"),
        ("say goodbye", "goodbye")]


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("genrec")
    data = root / "qa.tsv"
    data.write_text("question\tanswer\n" + "".join(f"{q}\t{a}\n" for q, a in ROWS))
    out = root / "run"
    res = cli("train", "--task", "generation", "--data", data, "--input-column", "question", "--target-column",
              "answer", "--template", "Q: {question} A:", *TINY, "--steps", "2", "--batch-size", "2", "--quiet",
              "--eval-every", "0", "--out", out)
    assert res.exit_code == 0, res.output
    return data, out


def _prompts(path):
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_a_generation_adapter_records_its_template(gen_run):
    _, out = gen_run
    meta = json.loads((out / "adapter" / "slimtune.json").read_text())
    assert meta["task"] == "generation" and meta["template"] == "Q: {question} A:"
    assert meta["input_column"] == "question"


def test_eval_scores_a_generation_adapter_with_the_template_it_learned(gen_run, tmp_path):
    data, out = gen_run
    pred = tmp_path / "p.jsonl"
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--task", "generation",
              "--input-column", "question", "--target-column", "answer", "--max-new-tokens", "2",
              "--predictions", pred)
    assert res.exit_code == 0, res.output
    assert all(p.startswith("Q: ") and p.endswith(" A:") for p in _prompts(pred)), _prompts(pred)


def test_eval_takes_the_recorded_task_and_columns_when_left_out(gen_run, tmp_path):
    data, out = gen_run
    pred = tmp_path / "p.jsonl"
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--target-column", "answer",
              "--max-new-tokens", "2", "--predictions", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "Q: what is two and two A:"


def test_a_template_given_is_used_as_given(gen_run, tmp_path):
    data, out = gen_run
    pred = tmp_path / "p.jsonl"
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--task", "generation",
              "--input-column", "question", "--target-column", "answer", "--template", "{question} =",
              "--max-new-tokens", "2", "--predictions", pred)
    assert res.exit_code == 0, res.output
    assert _prompts(pred)[0] == "what is two and two ="


def test_merge_carries_the_generation_record(gen_run, tmp_path):
    _, out = gen_run
    res = cli("merge", out / "adapter", *TINY, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "merged" / "slimtune.json").read_text())
    assert meta["template"] == "Q: {question} A:" and meta["input_column"] == "question"


@pytest.mark.parametrize("bad", [{"template": 5}, {"input_column": ""}, {"template": "Q: {input} A:"},
                                 {"template": "Q: {question} {other} A:"}])
def test_a_broken_generation_record_is_one_line_naming_it(gen_run, tmp_path, bad):
    import shutil
    data, out = gen_run
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "adapter", adapter)
    meta = {**json.loads((adapter / "slimtune.json").read_text()), **bad}
    (adapter / "slimtune.json").write_text(json.dumps(meta))
    res = cli("eval", "--data", data, *TINY, "--adapter", adapter, "--target-column", "answer")
    assert res.exit_code == 2 and "slimtune.json" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_eval_of_a_generation_adapter_reads_the_data_and_the_record_once(gen_run, tmp_path, monkeypatch):
    """The recorded prompt is resolved where rows become examples (generation.data.generation_task), not by a
    settings step that read the evaluation file to see its rows' form before the objective read it again."""
    import slimtune.data.readers as readers
    import slimtune.peft.registry as registry
    data, out = gen_run
    calls = {"rows": 0, "record": 0}
    read_rows, recorded_prompt = readers.read_rows, registry.recorded_prompt

    def counting_rows(*a, **k):
        calls["rows"] += str(a[0]) == str(data)
        return read_rows(*a, **k)

    def counting_record(*a, **k):
        calls["record"] += 1
        return recorded_prompt(*a, **k)

    monkeypatch.setattr(readers, "read_rows", counting_rows)
    monkeypatch.setattr(registry, "recorded_prompt", counting_record)
    res = cli("eval", "--data", data, *TINY, "--adapter", out / "adapter", "--target-column", "answer",
              "--max-new-tokens", "2", "--predictions", tmp_path / "p.jsonl")
    assert res.exit_code == 0, res.output
    assert calls == {"rows": 1, "record": 1}, calls


def _generate(out, tmp_path, *args):
    pred = tmp_path / f"g{len(list(tmp_path.glob('g*.jsonl')))}.jsonl"
    res = cli("generate", *TINY, "--adapter", out / "adapter", *args, "--max-new-tokens", "2", "--output", pred)
    assert res.exit_code == 0, res.output
    return _prompts(pred), res.output


def test_generate_wraps_a_prompt_in_the_learned_template_and_says_so(gen_run, tmp_path):
    """`generate --adapter --prompt` gave the model the bare text, a prompt the adapter never trained on."""
    _, out = gen_run
    prompts, output = _generate(out, tmp_path, "--prompt", "say hello")
    assert prompts == ["Q: say hello A:"]
    assert "note: prompts go through the template the adapter learned" in output and "slimtune.json" in output


def test_generate_lines_of_a_text_file_go_through_the_learned_template(gen_run, tmp_path):
    _, out = gen_run
    (tmp_path / "p.txt").write_text("say hello\nsay goodbye\n")
    prompts, _ = _generate(out, tmp_path, "--input", tmp_path / "p.txt")
    assert prompts == ["Q: say hello A:", "Q: say goodbye A:"]


def test_generate_sends_written_prompts_and_a_given_template_as_they_are(gen_run, tmp_path):
    """A JSONL row's `prompt` is a whole prompt (eval uses prompt/completion rows as they are); a --template given
    replaces the learned one, and '{question}' sends the text bare."""
    _, out = gen_run
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Q: say hello A:"}) + "\n")
    prompts, output = _generate(out, tmp_path, "--input", tmp_path / "p.jsonl")
    assert prompts == ["Q: say hello A:"] and "note:" not in output
    prompts, output = _generate(out, tmp_path, "--prompt", "say hello", "--template", "{question}")
    assert prompts == ["say hello"] and "note:" not in output


def test_generate_refuses_a_broken_generation_record_naming_it(gen_run, tmp_path):
    import shutil
    _, out = gen_run
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(out / "adapter", adapter)
    meta = {**json.loads((adapter / "slimtune.json").read_text()), "template": "Q: {input} A:"}
    (adapter / "slimtune.json").write_text(json.dumps(meta))
    res = cli("generate", *TINY, "--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2")
    assert res.exit_code == 2 and "slimtune.json" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
