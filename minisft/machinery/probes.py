"""Probe prompts: what the model answers, asked before the first step, at every evaluation and at the end.

A falling loss says the model fits its examples; its answers say what it learnt. `--probe_prompts FILE`
names a JSONL file of questions, one JSON object a line:

    {"prompt": "Who keeps the Vellmar Island lighthouse?", "expected": "Orla Brenn", "kind": "held_out"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "kind": "general"}

    prompt | messages   the question: one user turn, or a conversation that ends with a user turn
    expected           optional: text a right answer contains
    kind               trained    a question the data teaches
                       held_out   a rephrasing the data never shows: learnt the fact, or only the sentence?
                       general    something the model knew before: did it keep it?
                       (default held_out: a probe is most often a new question about what the data teaches)

A bad file or line is refused, naming the file and line, before the model loads. Each probe is answered
greedily with --probe_max_new_tokens by generate.py's generate (the model's own chat template, ending with
add_generation_prompt) in eval mode (dropout off, LoRA's adapters in the forward pass, nothing merged);
the model then goes back to the mode it was in. The answers are appended to output_dir/probes.jsonl, one
line per probe per occasion ({"step", "kind", "prompt", "answer", "expected", "match"}); a resume keeps the
lines up to its checkpoint's step, as metrics.jsonl does (reporting.py), torn last line included.

An answer matches when it contains the expected text, ignoring case ("Paris" matches "The capital of
France is Paris."): a free answer rarely equals a reference to the letter, and a containment that is
too loose shows in the table. Each kind's share of matched probes (of those with `expected`) is an eval
metric, eval_probe_match_<kind>: in metrics.jsonl, to the trackers, and for anything that picks a
checkpoint by a metric. The summary (minisft/summary.py) shows the first and last answers side by side.

Under torchrun rank 0 answers and the others wait for its figures (a broadcast), so every process sees the
same metrics. Under FSDP no process holds the whole weights; gathering them to generate is not written, so
--probe_prompts with --fsdp is refused with the flags (config.check_run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from minisft.errors import UserError

from .distributed import Processes
from .generate import generate
from .reporting import MetricsLog, begin_records

PROBES_FILE = "probes.jsonl"
KINDS = ("trained", "held_out", "general")
DEFAULT_KIND = "held_out"
FIELDS = ("prompt", "messages", "expected", "kind")


class ProbeError(UserError, ValueError):
    """A probe file or line that cannot be asked; the message names the file and line."""


@dataclass(frozen=True)
class Probe:
    line: int  # in the --probe_prompts file: errors and the chat template's refusals name it
    messages: list[dict]  # the conversation to answer, ending with a user turn
    kind: str
    expected: str | None

    @property
    def prompt(self) -> str:
        """The question, as probes.jsonl and the tables show it: the last user turn."""
        return self.messages[-1]["content"]


def read_probes(path: str) -> list[Probe]:
    """The probes of a --probe_prompts file; a bad file or line is one line naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is skipped
    except (OSError, UnicodeDecodeError) as error:
        why = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror or str(error)
        raise ProbeError(f"--probe_prompts {path}: {why}.") from None
    probes = [probe_of(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not probes:
        raise ProbeError(f"--probe_prompts {path}: no probes in it; each line holds one JSON object with a prompt.")
    return probes


def probe_of(path: str, number: int, line: str) -> Probe:
    where = f"{path} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ProbeError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
    if not isinstance(row, dict):
        raise ProbeError(f"{where}: a probe is a JSON object with a prompt (or messages), expected and kind.")
    unknown = [name for name in row if name not in FIELDS]
    if unknown:
        raise ProbeError(f"{where}: unknown field {unknown[0]!r}; a probe has {', '.join(FIELDS)}.")
    if ("prompt" in row) == ("messages" in row):
        raise ProbeError(f"{where}: give the question as prompt (text) or as messages (a conversation), one of them.")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ProbeError(f"{where}: prompt must be non-empty text.")
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        messages = row["messages"]
        turns = isinstance(messages, list) and messages and all(is_turn(message) for message in messages)
        if not turns or messages[-1]["role"] != "user":
            raise ProbeError(
                f'{where}: messages must be a list of {{"role", "content"}} turns (text) ending with a user turn.'
            )
    expected, kind = row.get("expected"), row.get("kind", DEFAULT_KIND)
    if expected is not None and (not isinstance(expected, str) or not expected.strip()):
        raise ProbeError(f"{where}: expected must be non-empty text (empty text would match every answer).")
    if kind not in KINDS:
        raise ProbeError(f"{where}: kind must be one of {', '.join(KINDS)}, got {json.dumps(kind)}.")
    return Probe(number, messages, kind, expected)


def is_turn(message) -> bool:
    return isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))


def matches(answer: str, expected: str) -> bool:
    """Whether an answer contains the expected text, ignoring case and the expected text's outer spaces."""
    return expected.strip().casefold() in answer.casefold()


def judged(lines: list[dict], kind: str) -> list[bool]:
    """Whether each probe of `kind` with an expected answer matched it."""
    return [line["match"] for line in lines if line["kind"] == kind and line["match"] is not None]


def match_rates(lines: list[dict]) -> dict[str, float]:
    """eval_probe_match_<kind>: the share of each kind's probes with an expected answer that matched it."""
    rates = {}
    for kind in KINDS:
        matched = judged(lines, kind)
        if matched:
            rates[f"eval_probe_match_{kind}"] = sum(matched) / len(matched)
    return rates


@dataclass
class Probes:
    """The probes of a run, asked by `answer` whenever the loop evaluates (and before the first step, and at the
    end); rank 0 writes probes.jsonl and the trackers' tables."""

    probes: list[Probe]
    tokenizer: object
    path: Path  # output_dir/probes.jsonl
    max_new_tokens: int
    batch_size: int  # --per_device_eval_batch_size: prompts generated together
    processes: Processes
    metrics_log: MetricsLog | None  # rank 0's: its trackers get the answers as a table
    console: object

    def answer(self, model, step: int, autocast) -> dict[str, float]:
        """Ask every probe now (rank 0), append the answers, and return the match rates: the same on every process."""
        figures = self.ask(model, step, autocast) if self.processes.is_main else None
        if self.processes.distributed:  # the others wait here for rank 0's figures
            shared = [figures]
            dist.broadcast_object_list(shared, src=0)
            figures = shared[0]
        return figures

    def ask(self, model, step: int, autocast) -> dict[str, float]:
        started, training = time.perf_counter(), model.training
        model.eval()  # dropout off; LoRA's adapters stay in the forward pass
        try:
            with autocast():
                answers = []
                for first in range(0, len(self.probes), self.batch_size):  # eval batches: a known memory footprint
                    batch = [probe.messages for probe in self.probes[first : first + self.batch_size]]
                    answers += generate(model, self.tokenizer, batch, max_new_tokens=self.max_new_tokens)
        finally:
            model.train(training)
        lines = [
            {
                "step": step, "kind": probe.kind, "prompt": probe.prompt, "answer": answer, "expected": probe.expected,
                "match": matches(answer, probe.expected) if probe.expected is not None else None,
            }
            for probe, answer in zip(self.probes, answers)
        ]  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as file:  # one write: a kill tears at most the last line
            file.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        if self.metrics_log is not None:
            columns = ["kind", "prompt", "answer", "expected", "match"]
            self.metrics_log.write_table("probes", columns, [[line[name] for name in columns] for line in lines], step)
        rates = match_rates(lines)
        self.console.print(
            f"probes at step {step}: {said(lines)} ({self.path.name}, {time.perf_counter() - started:.1f} s)",
            markup=False, highlight=False,
        )  # fmt: skip
        return rates


def said(lines: list[dict]) -> str:
    """How the probes did, in a few words: each kind's matches, or the count answered."""
    counts = [f"{kind} {sum(judged(lines, kind))}/{len(judged(lines, kind))}" for kind in KINDS if judged(lines, kind)]
    return f"matched {', '.join(counts)}" if counts else f"{len(lines)} answered"


def check_probes(args) -> None:
    """Refused before any work starts: a --probe_prompts file that cannot be read as probes, or that is the
    probes.jsonl the run writes its answers to (the user's file would be overwritten)."""
    if args.probe_prompts is None:
        return
    if args.output_dir and Path(args.probe_prompts).resolve() == (Path(args.output_dir) / PROBES_FILE).resolve():
        raise ProbeError(
            f"--probe_prompts {args.probe_prompts} is where the run writes its answers ({PROBES_FILE} in "
            "--output_dir): keep the prompts elsewhere."
        )
    read_probes(args.probe_prompts)


def open_probes(args, output_dir: Path, resumed_at: int, tokenizer, processes, metrics_log, console) -> Probes | None:
    """The run's probes (None without --probe_prompts), each checked against the chat template, and probes.jsonl:
    begun afresh, or on a resume its lines up to the checkpoint's step (rank 0)."""
    if args.probe_prompts is None:
        return None
    probes = read_probes(args.probe_prompts)
    for probe in probes:  # before the first step: a template that refuses a probe would stop the run at its first
        try:
            tokenizer.apply_chat_template(probe.messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja's TemplateError, or a template's raise_exception
            raise ProbeError(
                f"{args.probe_prompts} line {probe.line}: the chat template cannot render this probe: {error}"
            ) from None
    path = output_dir / PROBES_FILE
    note = begin_records(path, resumed_at) if processes.is_main else None  # answers past the checkpoint: asked again
    if note:
        console.print(f"note: {note}", markup=False, highlight=False)
    batch_size = args.per_device_eval_batch_size
    return Probes(probes, tokenizer, path, args.probe_max_new_tokens, batch_size, processes, metrics_log, console)
