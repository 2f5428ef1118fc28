"""What a run optimises and how it is evaluated, behind one interface the trainer uses for every optimizer:

- `classification`: cross-entropy of the label word at the end of a prompt (train/classification.py); accuracy, loss.
- `generation`: mean token cross-entropy of the completion (generation/objective.py); loss, perplexity and, when
  decoding is on, BLEU, ROUGE-L, exact match and token F1 of greedy/beam outputs (generation/metrics.py).

Reading is two-phase because chat rows are rendered with the tokenizer, while tiny test models fit their tokenizer
to the data: `load` gives raw rows and their texts, `examples` turns them into examples once the tokenizer exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtune import SlimtuneError


@dataclass
class GenerationSettings:
    input_column: str | None = None  # tables: the prompt column (default "input"); JSONL uses prompt/messages
    target_column: str | None = None  # tables: the completion column (default "target")
    max_new_tokens: int = 64
    num_beams: int = 1
    eval_generate: bool = True  # decode during evaluation (BLEU/ROUGE-L/EM/F1); off: loss and perplexity only
    eval_batch_size: int = 16
    learned: dict | None = None  # eval of a generation adapter: its recorded {template, input_column} (tables)


LOWER_IS_BETTER = ("loss", "perplexity")


class ClassificationObjective:
    kind = "classification"
    default_best = "accuracy"
    warn_per_batch = True  # nothing to warn about per batch

    def __init__(self, task, eval_batch_size: int = 32, max_length: int = 256, column_flags: bool = True):
        self.task, self.eval_batch_size, self.tokenizer, self.label_ids = task, eval_batch_size, None, None
        self.max_length, self.column_flags = max_length, column_flags

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("accuracy", "loss")

    @property
    def public_words(self) -> list[str]:
        """Words a tiny test model's tokenizer must know whatever the data: the label words it scores."""
        return [w.strip() for w in self.task.label_words]

    def load(self, source: str, split: str):
        from slimtune.data import read_examples
        examples = read_examples(source, self.task, split, self.column_flags)
        return examples, [e.prompt for e in examples]

    def examples(self, raw, tokenizer) -> list:
        return raw

    def bind(self, tokenizer) -> None:
        from slimtune.train.classification import label_token_ids
        self.tokenizer, self.label_ids = tokenizer, label_token_ids(tokenizer, self.task)

    def texts(self, examples: list) -> list[str]:
        return [e.prompt for e in examples]

    def row_keys(self, raw) -> list[str]:
        """One key per row of `load`'s raw rows, equal for rows that are the same example (see `overlap_key`)."""
        return [overlap_key(e.prompt) for e in raw]

    def encode(self, examples: list, max_length: int):
        from slimtune.train.classification import encode
        return encode(self.tokenizer, examples, max_length)

    def losses(self, model, batch):
        from slimtune.train.classification import per_example_losses
        return per_example_losses(model, batch, self.label_ids)

    def evaluate(self, model, examples: list, device: str, predictions: list | None = None) -> dict:
        """Accuracy and loss (`predictions`: generation only; the CLI refuses it for classification)."""
        from slimtune.train.classification import evaluate
        return evaluate(model, self.tokenizer, examples, self.label_ids, self.eval_batch_size, device, self.max_length)


class GenerationObjective:
    kind = "generation"
    default_best = "loss"
    warn_per_batch = True  # per-batch truncation warnings (the trainer turns them off and says it once instead)

    def __init__(self, task, settings: GenerationSettings, max_length: int):
        self.task, self.settings, self.max_length, self.tokenizer = task, settings, max_length, None

    public_words: list[str] = []

    @property
    def metrics(self) -> tuple[str, ...]:
        from slimtune.generation.metrics import METRICS
        return ("loss", "perplexity", *(METRICS if self.settings.eval_generate else ()))

    def load(self, source: str, split: str):
        from slimtune.data.readers import read_rows
        rows, name = read_rows(source, split)
        if rows and "messages" in rows[0][1]:  # checked here, before the model loads (rendering needs its tokenizer)
            from slimtune.generation.data import check_conversation
            for line, row in rows:
                check_conversation(row, f"{name}:{line}")
        else:  # every row's fields, before the model loads (they need no tokenizer)
            from slimtune.generation.data import rows_to_examples
            rows_to_examples(rows, self.task, name)
        texts = [v for _, row in rows for v in _strings(row)]
        return (rows, name), texts

    def examples(self, raw, tokenizer) -> list:
        from slimtune.generation.data import rows_to_examples
        rows, name = raw
        return rows_to_examples(rows, self.task, name, tokenizer)

    def bind(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise SlimtuneError("generation needs a tokenizer with an end-of-sequence token (eos_token)")
        self.tokenizer = tokenizer

    def texts(self, examples: list) -> list[str]:
        return [e.prompt + " " + e.completion for e in examples]

    def row_keys(self, raw) -> list[str]:
        """One key per row of `load`'s raw rows (see `overlap_key`): a chat row's messages in order (rendering them
        needs the tokenizer), else its prompt and completion. A text shared by different rows (a system prompt, an
        instruction) does not make them the same row."""
        rows, _ = raw
        if rows and "messages" in rows[0][1]:
            return [overlap_key("\n".join(_strings({"messages": row.get("messages")}))) for _, row in rows]
        return [overlap_key(text) for text in self.texts(self.examples(raw, None))]

    def encode(self, examples: list, max_length: int):
        from slimtune.generation.objective import encode_generation
        return encode_generation(self.tokenizer, examples, max_length, warn=self.warn_per_batch)

    def losses(self, model, batch):
        from slimtune.generation.objective import per_example_generation_losses
        return per_example_generation_losses(model, batch)

    def evaluate(self, model, examples: list, device: str, predictions: list | None = None) -> dict:
        """Loss/perplexity over every row; decoding metrics over the distinct prompts (all references each).
        `predictions`, when a list, receives {"prompt", "prediction", "references"} per distinct prompt."""
        from slimtune.generation.data import group_references
        from slimtune.generation.decode import DecodeSettings, generate_texts
        from slimtune.generation.metrics import generation_metrics
        from slimtune.generation.objective import generation_loss

        s = self.settings
        result = generation_loss(model, self.tokenizer, examples, self.max_length, s.eval_batch_size, device)
        if s.eval_generate or predictions is not None:
            grouped = group_references(examples)
            outputs = generate_texts(model, self.tokenizer, [e.prompt for e in grouped],
                                     DecodeSettings(s.max_new_tokens, s.num_beams, s.eval_batch_size, self.max_length),
                                     device)
            result.update(generation_metrics(outputs, [e.references for e in grouped]))
            if predictions is not None:
                predictions += [{"prompt": e.prompt, "prediction": o, "references": list(e.references)}
                                for e, o in zip(grouped, outputs)]
        return result


def overlap_key(text: str) -> str:
    """What two rows must share to count as the same example in an overlap check: the text up to case and
    whitespace (a copied row re-spaced or upper-cased is still that row)."""
    return " ".join(text.casefold().split())


def _strings(row: dict) -> list[str]:
    out = []
    for value in row.values():
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return out


def load_model_and_data(objective, model_name: str, train_path: str, eval_path: str | None, seed: int,
                        dtype=None, device: str = "cpu", fit_tokenizer_to_training_data: bool = True,
                        base_quant: str | None = None, loaded_train: tuple | None = None):
    """(model, tokenizer, train examples, eval examples): read the data, load the model (tiny test models fit their
    tokenizer to these texts — to the evaluation texts only when `fit_tokenizer_to_training_data` is False, as in
    private runs, whose saved tokenizer must not list training words; the model is initialised under `seed`), bind the
    objective to the tokenizer, then turn the rows into examples (chat rows need the tokenizer's template).
    `loaded_train`: `objective.load(train_path, "train")`'s result where the caller read it already (one reading of
    the file for all that uses its rows)."""
    import torch

    from slimtune.models import load_model_and_tokenizer

    if loaded_train is None:
        loaded_train = objective.load(train_path, "train") if train_path else (None, [])  # a server without rows
    raw_train, texts = loaded_train
    raw_eval, eval_texts = objective.load(eval_path, "validation") if eval_path else (None, [])
    torch.manual_seed(seed)
    fitted = (texts if fit_tokenizer_to_training_data else []) + eval_texts
    fitted += unseen_words(objective.public_words, fitted)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype or torch.float32, device, fitted,
                                                base_quant=base_quant)
    objective.bind(tokenizer)
    evals = objective.examples(raw_eval, tokenizer) if raw_eval is not None else []
    return model, tokenizer, objective.examples(raw_train, tokenizer) if raw_train is not None else [], evals


def unseen_words(words: list[str], texts: list[str]) -> list[str]:
    """[the words a tiny model's tokenizer would not otherwise know, as one text] (none: []; words already in the
    texts or its base vocabulary are not repeated, which would reorder the vocabulary a test rebuilds)."""
    from slimtune.models.loading import TINY_BASE_WORDS
    known = set(TINY_BASE_WORDS.split()).union(*(t.split() for t in texts)) if texts else set(TINY_BASE_WORDS.split())
    missing = [w for w in words if w not in known]
    return [" ".join(missing)] if missing else []


def build_objective(config):
    """The objective of a TrainConfig."""
    return make_objective(config.task, config.text_column, config.label_column, config.template, config.label_words,
                          config.generation, config.max_length)


def make_objective(task: str, text_column=None, label_column=None, template=None, label_words=None,
                   generation: GenerationSettings | None = None, max_length: int = 256,
                   eval_batch_size: int = 32, column_flags: bool = True):
    """Task "generation" (its eval batch size is in `generation`) or a classification task (sst2, rte, custom).
    `column_flags`: the command takes --text-column / --label-column (messages name them)."""
    from slimtune.data import get_task
    from slimtune.generation.data import generation_task

    if task == "generation":
        g = generation or GenerationSettings()
        if g.max_new_tokens < 1 or g.num_beams < 1:
            raise SlimtuneError("--max-new-tokens and --num-beams must be >= 1")
        return GenerationObjective(generation_task(g.input_column, g.target_column, template, g.learned), g, max_length)
    return ClassificationObjective(get_task(task, text_column, label_column, template, label_words), eval_batch_size,
                                   max_length, column_flags)


def check_best_metric(objective, name: str | None) -> str:
    name = name or objective.default_best
    if name not in objective.metrics:
        raise SlimtuneError(f"--best-metric {name!r}: a {objective.kind} run evaluates "
                            f"{', '.join(objective.metrics)}")
    return name


def is_better(metric: str, new: dict, old: dict | None) -> bool:
    """new beats old on `metric` (ties: lower loss wins); None (nothing yet) is always beaten."""
    if old is None:
        return True
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return (sign * new[metric], -new["loss"]) > (sign * old[metric], -old["loss"])
