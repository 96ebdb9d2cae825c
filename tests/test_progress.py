"""Progress that reads wherever the run's output goes (a pipe, a notebook), and figures that do not mislead:
rates that never read 0, the bf16-on-a-CPU warning, an adapter's base that peft loads offline."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
from rich.console import Console

import minisft.machinery.models
import minisft.machinery.progress
from minisft.machinery.config import LoraConfig
from minisft.machinery.loop import train
from minisft.machinery.models import EMBEDDED_MODEL_NAME
from minisft.machinery.progress import NotebookTable, figures, readable_rate

from .tiny_runs import data_file_of, metrics, run_config

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(r"step (\d+)/4 · loss \d+\.\d{4}( · eval \d+\.\d{4})? · lr \d\.\d\de-\d\d · [\d,.]+ tok/s")


# ----------------------------------------------------------------------------- where the progress goes


def test_a_run_piped_to_a_file_prints_a_line_per_logged_record(tiny_dir, tmp_path):
    flags = ["--model_name_or_path", tiny_dir, "--dataset_name", str(data_file_of(tiny_dir))]
    flags += ["--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--logging_steps", "1"]
    flags += ["--eval_split_size", "0.2", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "0"]
    with open(tmp_path / "log.txt", "w") as log:  # stderr is a file, as under `2> log` or in CI
        child = subprocess.run([sys.executable, "-m", "minisft.train", *flags], stderr=log, stdout=log, timeout=300)
    printed = (tmp_path / "log.txt").read_text()
    assert child.returncode == 0, printed
    lines = [match for match in map(LINE.fullmatch, printed.splitlines()) if match]
    assert [(int(line[1]), bool(line[2])) for line in lines] == [(1, False), (2, True), (3, False), (4, True)], printed
    assert "━" not in printed  # no bar drawn into the file


def fake_ipython(monkeypatch, kernel=True) -> list:
    """IPython as a notebook's kernel has it, with a display() that records its handles: their .shown is every
    HTML the handle showed, first the one display() was given, then each update."""
    handles = []

    class Handle:
        def __init__(self, first):
            self.shown = [first]

        def update(self, html):
            self.shown.append(html)

    def display(html, display_id=False):
        assert display_id is True  # a handle to update, not one output per update
        handles.append(Handle(html))
        return handles[-1]

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object() if kernel else None)
    shown = types.ModuleType("IPython.display")
    shown.HTML, shown.display = lambda html: html, display
    ipython.display = shown
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", shown)
    return handles


def table_rows(html: str) -> list[list[str]]:
    body = html.split("<tbody>", 1)[1]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_in_a_notebook_the_run_keeps_one_table_with_a_row_per_logged_record(tiny_dir, tmp_path, monkeypatch):
    handles = fake_ipython(monkeypatch)
    config = run_config(tiny_dir, tmp_path / "out", max_steps=4, eval_strategy="steps", eval_steps=2)
    config.data.eval_split_size = 0.2
    printed = io.StringIO()
    train(config, Console(file=printed, width=200))
    assert len(handles) == 1  # one output, updated in place: the saved notebook holds its last state
    final = handles[0].shown[-1]
    header = re.findall(r"<th>(.*?)</th>", final)
    assert header[:3] == ["step", "epoch", "loss"] and "eval_loss" in header and "tokens_per_second" in header
    rows = table_rows(final)
    logged = metrics(tmp_path / "out")
    assert [row[0] for row in rows] == [str(record["step"]) for record in logged] == ["1", "2", "3", "4"]
    eval_column = header.index("eval_loss")
    assert [bool(row[eval_column]) for row in rows] == [False, True, False, True]
    assert f"{logged[-1]['eval_loss']:.4g}" == rows[-1][eval_column]
    assert "step 4/4" in final
    assert "step 1/4" not in printed.getvalue()  # nothing else written per step


def test_the_notebook_table_redraws_its_one_handle_for_each_record(monkeypatch):
    handles = fake_ipython(monkeypatch)
    monkeypatch.setattr(minisft.machinery.progress, "NOTEBOOK_REDRAW_SECONDS", 3600)  # no redraws on a timer
    with NotebookTable(total_steps=3, completed=0) as table:
        table.show({"step": 0, "epoch": 0.0, "eval_loss": 2.5})
        for step in (1, 2, 3):
            table.advance(step)
            table.show({"step": step, "epoch": step / 3, "loss": 2.0 / step, "tokens_per_second": 0.25})
    (handle,) = handles
    assert len(handle.shown) == 1 + 4 + 1  # the empty table, a redraw per record, and one as the run ends
    assert [len(table_rows(html)) for html in handle.shown[:5]] == [0, 1, 2, 3, 4]
    rows = table_rows(handle.shown[-1])
    assert rows[0] == ["0", "0", "2.5", "", ""]  # the evaluation before training: no train figures
    assert rows[-1] == ["3", "1", "", "0.6667", "0.25"]


def test_outside_a_kernel_ipython_gets_no_table(monkeypatch):
    from minisft.machinery.progress import PlainLines, progress_display

    fake_ipython(monkeypatch, kernel=False)  # IPython in a terminal: no kernel, no notebook to draw in
    assert isinstance(progress_display(Console(file=io.StringIO()), 3, 0), PlainLines)


# ----------------------------------------------------------------------------- honest figures


def test_rates_keep_their_digits():
    assert [readable_rate(rate) for rate in (0.0412, 0.4, 7.25, 99.4, 412.4, 12345.6)] == [
        "0.0412", "0.4", "7.25", "99.4", "412", "12,346",
    ]  # fmt: skip
    assert figures({"loss": 2.1, "tokens_per_second": 0.3}) == "loss 2.1000 · 0.3 tok/s"


@pytest.mark.parametrize(
    ("flags", "has_amx", "warned"),
    [
        ({"bf16": True}, False, "bf16 autocast (--bf16)"),
        ({"bf16": True}, True, None),
        ({}, False, None),
    ],
)
def test_bf16_on_a_cpu_without_amx_is_warned_in_the_opening_lines(
    tiny_dir, tmp_path, monkeypatch, flags, has_amx, warned
):
    monkeypatch.setattr(minisft.machinery.models, "cpu_has_amx", lambda: has_amx)
    printed = io.StringIO()
    train(run_config(tiny_dir, tmp_path / "out", max_steps=1, **flags), Console(file=printed, width=1000))
    lines = printed.getvalue().splitlines()
    opening = next(index for index, line in enumerate(lines) if line.startswith("run out:"))
    warnings = [line for line in lines if "without AMX" in line]
    if warned is None:
        assert warnings == []
    else:
        assert warnings == [lines[opening + 1]]  # one line, right under the run's opening line
        assert lines[opening + 1].startswith(f"warning: {warned} on a CPU without AMX")
        assert "4-8× slower than in float32" in lines[opening + 1]


def test_bfloat16_weights_on_a_cpu_without_amx_are_warned(monkeypatch):
    import torch

    monkeypatch.setattr(minisft.machinery.models, "cpu_has_amx", lambda: False)
    warning = minisft.machinery.models.slow_bf16_warning(torch.device("cpu"), False, "bfloat16")
    assert warning.startswith("warning: bfloat16 weights (--dtype) on a CPU without AMX")
    assert minisft.machinery.models.slow_bf16_warning(torch.device("cpu"), False, "float32") is None
    monkeypatch.setattr(minisft.machinery.models, "cpu_has_amx", lambda: None)  # cannot tell: say nothing
    assert minisft.machinery.models.slow_bf16_warning(torch.device("cpu"), True, "bfloat16") is None


def test_an_adapter_of_the_embedded_model_loads_in_peft_offline(tiny_dir, tmp_path, monkeypatch):
    """The embedded model's name is minisft's: the adapter records its converted folder, which peft can load."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_dir, cache / EMBEDDED_MODEL_NAME)  # the tiny model stands in for the converted one
    monkeypatch.setenv("MINISFT_CACHE", str(cache))
    config = run_config(EMBEDDED_MODEL_NAME, tmp_path / "out", max_steps=1, lora=LoraConfig(use_peft=True, lora_r=4))
    config.data.dataset_name = str(data_file_of(tiny_dir))
    train(config, Console(file=io.StringIO()))
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((cache / EMBEDDED_MODEL_NAME).resolve())
    code = (
        "import sys; from peft import AutoPeftModelForCausalLM; "
        "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); "
        "print(sum('lora_A' in name for name, _ in model.named_parameters()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # read when huggingface_hub is imported: hence a child process
    child = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert int(child.stdout.split()[-1]) > 0  # the adapter's layers, injected by peft into the local base
