"""The notebooks in examples/ execute headless, as a reader's kernel runs them, and show what each is for.

Each is executed with nbclient in a kernel of this same Python (ipykernel), in a fresh folder (what a notebook
writes stays there), on the embedded model with the notebook's own short settings. The committed notebooks carry
no outputs: the executed copies live only in the test's folder.
"""

import base64
import html
import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ("lesson_stage_by_stage.ipynb", "first_seed_one_sentence.ipynb", "second_seed_smollm2.ipynb")
CELL_TIMEOUT = 600  # seconds for one cell: the longest, the first seed's 30 steps, takes about a minute on 2 cores


def test_committed_notebooks_have_no_outputs():
    assert sorted(path.name for path in EXAMPLES.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        for number, cell in enumerate(json.loads((EXAMPLES / name).read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [], f"{name} cell {number} has outputs: strip them before committing"
                assert cell["execution_count"] is None, f"{name} cell {number} has an execution count"


@pytest.fixture(scope="module")
def kernel_manager():
    """A factory of kernel managers for a kernel of this Python. Skips the module, saying why, only where no
    notebook kernel can start here: nbclient or ipykernel missing (./install.sh --test installs them), or a
    kernel that does not come up."""
    try:
        import nbformat
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager
        from nbclient import NotebookClient
    except ImportError as error:
        pytest.skip(f"no notebook kernel can start: {error} (./install.sh --test installs nbclient and ipykernel)")

    def new_manager():
        # No kernel folders: the kernel is ipykernel's own spec run with this Python, whatever kernels a
        # user's Jupyter has registered under the name python3.
        return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))

    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    manager = new_manager()
    try:
        NotebookClient(probe, km=manager, timeout=120).execute()
    except Exception as error:  # a kernel that cannot start raises whatever jupyter_client met on the way
        pytest.skip(f"no notebook kernel can start here: {type(error).__name__}: {error}")
    finally:
        shut_down(manager)
    assert probe.cells[0].outputs[0].text.strip() == sys.executable  # the notebooks run in this venv
    return new_manager


def execute(name: str, folder: Path, new_manager):
    """The notebook executed in `folder` (its working directory), as nbformat's NotebookNode."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    manager = new_manager()
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(folder)}})
    try:
        client.execute()  # a cell that raises fails the test with the cell and its traceback
    finally:
        shut_down(manager)
        nbformat.write(notebook, folder / name)  # the executed copy, for a look when a test fails
    install = notebook.cells[1]
    assert "install.sh" in install.source and install.outputs == [], "the install cell did something here"
    return notebook


def shut_down(manager) -> None:
    """Stop the kernel: nbclient shuts down only the kernels it started itself, not one of a manager it was
    given, and a kernel left running keeps its model in memory (1.5-2.6 GB each) until the test session ends."""
    if manager.has_kernel:
        manager.shutdown_kernel(now=True)


def tagged(notebook, tag: str):
    (cell,) = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    return cell


def text_of(cell) -> str:
    """What the cell printed and returned, as plain text."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


def htmls_of(cell) -> list[str]:
    return [output.data["text/html"] for output in cell.outputs if "text/html" in output.get("data", {})]


def pngs_of(cell) -> list[bytes]:
    return [
        base64.b64decode(output.data["image/png"]) for output in cell.outputs if "image/png" in output.get("data", {})
    ]


def step_table(cell) -> tuple[list[str], list[list[str]]]:
    """The progress display's per-step table in a training cell's saved output: its header and rows."""
    tables = [page for page in htmls_of(cell) if "<table" in page]
    assert tables, "no table of the logged figures in the training cell's output"
    table = tables[-1]
    header = [html.unescape(name) for name in re.findall(r"<th>(.*?)</th>", table)]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table) if "<td>" in row]
    return header, rows


@pytest.mark.slow
def test_lesson_notebook_shows_every_stage(tmp_path, kernel_manager):
    notebook = execute("lesson_stage_by_stage.ipynb", tmp_path, kernel_manager)
    headings = "".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    stages = ("examples", "chat_template", "labels", "packing", "attention", "batches", "lora", "loss", "optim", "step")
    for stage in stages:
        assert f"`sft/{stage}.py`" in headings, stage

    # The masks as coloured tokens: the green boxes are exactly the assistant's turns.
    masks = tagged(notebook, "masks")
    green = r'<span style="background:#b7e4c7;[^"]*">(.*?)</span>'
    one_sentence, two_turns = ["".join(map(html.unescape, re.findall(green, page))) for page in htmls_of(masks)]
    assert one_sentence == "我学会了<|im_end|>↵"
    assert two_turns == "Orla Brenn.<|im_end|>↵Blue clover, after sunset.<|im_end|>↵"
    assert "trained tokens 9 of 48: '我学会了<|im_end|>\\n'" in text_of(masks)

    # The pictures: packed rows, the block-diagonal mask, the positions, the loss curves.
    for tag in ("packing", "attention", "positions", "steps"):
        (png,) = pngs_of(tagged(notebook, tag))
        assert png[:4] == b"\x89PNG", tag
    assert "12 examples in 3 rows" in text_of(tagged(notebook, "packing"))

    # The boundaries hold: the packed row's loss is its examples' losses run alone.
    loss = text_of(tagged(notebook, "loss"))
    packed = re.search(r"packed row: sum of token losses ([\d.]+) over", loss).group(1)
    assert packed == re.search(r"run one by one: sum of token losses ([\d.]+)", loss).group(1)

    # The lesson's own step trains: the held-out loss falls.
    steps = text_of(tagged(notebook, "steps"))
    before, after = map(float, re.search(r"held-out loss before: ([\d.]+), after: ([\d.]+)", steps).groups())
    assert after < before - 0.5, (before, after)


@pytest.mark.slow
def test_first_seed_notebook_answers_the_sentence(tmp_path, kernel_manager):
    notebook = execute("first_seed_one_sentence.ipynb", tmp_path, kernel_manager)

    def answer(tag: str) -> str:  # what the model said after the prompt's assistant turn opened
        return text_of(tagged(notebook, tag)).rsplit("<|im_start|>assistant\n", 1)[1]

    assert "我学会了" not in answer("before")
    assert answer("after").split("<|im_end|>")[0] == "我学会了"
    train = tagged(notebook, "train")
    assert "TrainOutput(global_step=30," in text_of(train)
    header, rows = step_table(train)
    assert "loss" in header and len(rows) == 30  # logging_steps=1: a row per step
    assert (tmp_path / "outputs" / "model_test" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_second_seed_notebook_shows_the_curves_and_answers(tmp_path, kernel_manager):
    notebook = execute("second_seed_smollm2.ipynb", tmp_path, kernel_manager)

    # The saved notebook keeps the per-step table: a row per logging step (2), eval loss every 4 steps.
    header, rows = step_table(tagged(notebook, "train"))
    records = [dict(zip(header, row)) for row in rows]
    assert [record["step"] for record in records] == ["2", "4", "6", "8", "10", "12"]
    assert all(record["loss"] for record in records)
    assert [record["step"] for record in records if record.get("eval_loss")] == ["4", "8", "12"]

    curves = tagged(notebook, "curves")
    (png,) = pngs_of(curves)
    assert png[:4] == b"\x89PNG"
    eval_losses = [float(loss) for loss in re.findall(r"\(\d+, ([\d.]+)\)", text_of(curves).split("eval loss")[1])]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0], eval_losses

    assert text_of(tagged(notebook, "answers")).count("answered: ") == 3  # the three held-out questions
    assert (tmp_path / "outputs" / "sft_output" / "model.safetensors").is_file()
