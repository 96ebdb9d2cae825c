"""Nothing damaged in the preparation cache is trained on, and preparation fails or falls back cleanly.

Every damage here is done to the real files of a real preparation (load_and_prepare on a small JSONL
file with the SmolLM2 tokenizer), and every test fails on a preparation without the guard it tests:
a damaged file would be reused silently, an unwritable cache would be a traceback, a looping
template would never end (the `deadline` fixture turns that into a failure), a signal would leave a
partial folder or workers' tracebacks behind.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from minisft.machinery import cache, pack_plans, prepare, storage
from minisft.machinery.config import DataConfig, PackingConfig
from minisft.machinery.prepare import load_and_prepare
from minisft.sft import packing
from minisft.sft.examples import DataError

# The chat template of tests: ChatML, spinning ~0.17 s on a row whose message says SLOW (the signal tests) and
# for days on one that says LOOP (Jinja's sandbox caps a range at 100,000: nested, they multiply).
TEMPLATE = (
    "{% for message in messages %}"
    "{% if 'SLOW' in message['content'] %}{% for j in range(50) %}{% for i in range(100000) %}{% endfor %}"
    "{% endfor %}{% endif %}"
    "{% if 'LOOP' in message['content'] %}{% for j in range(100000) %}{% for i in range(100000) %}{% endfor %}"
    "{% endfor %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


def write_rows(path: Path, count: int, word: str = "", special: dict[int, str] | None = None) -> None:
    """`count` conversations, one per line; line n's question holds special[n] when given (1-based lines)."""
    lines = []
    for index in range(count):
        question = (special or {}).get(index + 1, f"Question {index}? {word}")
        answer = f"Answer {index}: " + " ".join(["word"] * (index % 9 + 1))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    write_rows(path, 12)
    return path


def prepared(data, tokenizer, cache_dir, **flags):
    config = DataConfig(cache_dir=str(cache_dir), eval_split_size=0.25, **flags)
    return load_and_prepare(str(data), tokenizer, config, PackingConfig(), seed=3)


def assert_same(ours, fresh) -> None:
    """The same examples, origins and figures as a fresh preparation, split by split."""
    for split in ("train", "eval"):
        mine, theirs = getattr(ours, split), getattr(fresh, split)
        assert mine.examples == theirs.examples and list(mine.origins) == list(theirs.origins)
        assert mine.stats == theirs.stats
    assert ours.skipped_blank_lines == fresh.skipped_blank_lines


def folder_of(splits) -> Path:
    return splits.train.examples.folder.parent


# ----------------------------------------------------------------------------- damaged files


def zeroed(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def overwritten(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def removed(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "name, damage, said",
    [
        ("train/trained.bin", zeroed, "train/trained.bin: checksum mismatch"),
        ("train/input_ids.bin", overwritten, "train/input_ids.bin: checksum mismatch"),
        ("train/offsets.bin", truncated, "train/offsets.bin: "),
        ("eval/meta.json", cut_in_half, "eval/meta.json: "),
        ("train/origins.bin", removed, "train/origins.bin: missing"),
        ("blank_lines", removed, "blank_lines: missing"),
        ("manifest.json", cut_in_half, "manifest.json: unreadable"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_a_damaged_file_is_prepared_again(data, fresh_tokenizer, tmp_path, name, damage, said):
    cache_dir = tmp_path / "cache"
    first = prepared(data, fresh_tokenizer, cache_dir)
    folder = folder_of(first)
    del first  # its memory maps: the damage is to the files, as a later run finds them
    damage(folder / name)
    again = prepared(data, fresh_tokenizer, cache_dir)
    assert again.cache_note.startswith(f"data: the cached preparation in {folder} is damaged ({said}")
    assert again.cache_note.endswith("); prepared again")
    assert_same(again, prepared(data, fresh_tokenizer, "none"))
    assert "reused" in prepared(data, fresh_tokenizer, cache_dir).cache_note  # what was prepared again is intact
    assert not list(cache_dir.glob(".partial-*"))


def test_offsets_that_do_not_fit_are_refused_when_opened(data, fresh_tokenizer, tmp_path):
    """The structural checks, apart from the checksums: offsets that decrease, or end short of the ids."""
    split = folder_of(prepared(data, fresh_tokenizer, tmp_path / "cache")) / "train"
    offsets = np.fromfile(split / "offsets.bin", dtype=np.int64)
    offsets[[2, 3]] = offsets[[3, 2]]  # same size, same ends: only the order is wrong
    offsets.tofile(split / "offsets.bin")
    with pytest.raises(storage.DamagedFile, match="train/offsets.bin: the offsets do not run from 0 up"):
        storage.open_storage(split)
    (split / "trained.bin").write_bytes((split / "trained.bin").read_bytes()[:-1])
    with pytest.raises(storage.DamagedFile, match="train/trained.bin: .* tokens, input_ids.bin has"):
        storage.open_storage(split)


def test_a_damaged_pack_plan_is_planned_again(data, fresh_tokenizer, tmp_path, capsys):
    examples = prepared(data, fresh_tokenizer, tmp_path / "cache").train.examples
    fresh = packing.pack(list(examples), 32, "bfd")
    kept = examples.folder / "pack-bfd-32.npz"
    assert list(pack_plans.pack_prepared(examples, 32, "bfd").rows) == list(fresh.rows) and kept.exists()
    with np.load(kept) as saved:
        plan = {key: saved[key] for key in saved.files}
    # an edit that leaves a valid plan: the last row's examples dropped, as a hand or a bad copy might
    last = plan["row_offsets"][-2]
    for key in ("examples", "starts", "ends"):
        plan[key] = plan[key][:last]
    plan["row_offsets"] = plan["row_offsets"][:-1]
    with open(kept, "wb") as file:
        np.savez(file, **plan)
    capsys.readouterr()
    again = pack_plans.pack_prepared(examples, 32, "bfd")
    assert f"packing: the kept plan {kept} is damaged (checksum mismatch); planned again" in capsys.readouterr().err
    assert list(again.rows) == list(fresh.rows) and again.stats == fresh.stats
    cut_in_half(kept)
    assert list(pack_plans.pack_prepared(examples, 32, "bfd").rows) == list(fresh.rows)
    assert "is damaged (unreadable" in capsys.readouterr().err
    assert list(pack_plans.pack_prepared(examples, 32, "bfd").rows) == list(fresh.rows)  # the plan kept again is intact
    assert "damaged" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- a cache that cannot be written
# Tests run as root, where a read-only folder (chmod) is still written to. So the unwritable folder is a path
# through a regular file (what the system refuses even to root), and a full disk and a read-only folder are
# the errors the system would raise, raised by the writer's own open() and mkdir().


class FullDisk(io.FileIO):
    """A file being written on a full disk: created, but every write fails as it would (ENOSPC)."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["a file", "under a file", "full disk", "read-only"])
def test_an_unwritable_cache_falls_back_to_an_uncached_preparation(data, fresh_tokenizer, tmp_path, monkeypatch, where):
    cache_dir, real_mkdir = tmp_path / "cache", os.mkdir
    said = {"a file": "File exists", "under a file": "Not a directory", "full disk": "No space left on device",
            "read-only": "Permission denied"}[where]  # fmt: skip
    if where == "a file":
        cache_dir.write_text("mine", encoding="utf-8")
    elif where == "under a file":
        (tmp_path / "file").write_text("mine", encoding="utf-8")
        cache_dir = tmp_path / "file" / "cache"
    elif where == "full disk":
        real_open = open
        inside = lambda path: str(path).startswith(str(cache_dir))  # noqa: E731
        monkeypatch.setattr(storage, "open", lambda path, mode="r": FullDisk(path, mode) if inside(path) else
                            real_open(path, mode), raising=False)  # fmt: skip
    else:
        cache_dir.mkdir()

        def read_only(path, *args, **kwargs):
            if Path(path).parent == cache_dir:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only)
    splits = prepared(data, fresh_tokenizer, cache_dir)
    assert splits.cache_note == f"data: prepared, not cached ({cache_dir} cannot be written: {said})"
    assert splits.train.examples.folder is None  # not kept: mapped from a scratch folder already deleted
    monkeypatch.undo()
    assert_same(splits, prepared(data, fresh_tokenizer, "none"))
    if where == "a file":
        assert cache_dir.read_text(encoding="utf-8") == "mine"
    if cache_dir.is_dir():
        assert not list(cache_dir.iterdir())  # the partial folder of the full disk is gone


def test_a_pack_plan_that_cannot_be_kept_is_said(data, fresh_tokenizer, tmp_path, monkeypatch, capsys):
    examples = prepared(data, fresh_tokenizer, tmp_path / "cache").train.examples
    monkeypatch.setattr(pack_plans, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    packed = pack_plans.pack_prepared(examples, 32, "bfd")
    assert list(packed.rows) == list(packing.pack(list(examples), 32, "bfd").rows)
    assert f"packing: the plan is not kept in {examples.folder} (No space left on device)" in capsys.readouterr().err
    assert not [path for path in examples.folder.iterdir() if path.name.startswith("pack-")]


# ----------------------------------------------------------------------------- files that change, templates that loop


@pytest.mark.parametrize("when", ["after counting", "while reading"])
@pytest.mark.parametrize("cache_dir", ["cache", "none"])
def test_a_file_that_changes_while_prepared_is_refused(data, fresh_tokenizer, tmp_path, monkeypatch, when, cache_dir):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    grow = lambda: data.write_text(data.read_text(encoding="utf-8") * 2, encoding="utf-8")  # noqa: E731
    if when == "after counting":  # --eval_split_size drew its rows from the old count
        real = prepare.stream_splits
        monkeypatch.setattr(prepare, "stream_splits", lambda *args, **kwargs: (real(*args, **kwargs), grow())[0])
    else:
        real_append = prepare.StorageWriter.append
        monkeypatch.setattr(prepare.StorageWriter, "append", lambda *args: (grow(), real_append(*args)))
    cache_dir = tmp_path / cache_dir if cache_dir == "cache" else cache_dir
    with pytest.raises(DataError, match=f"^{data} changed while it was being prepared; run again once it is complete"):
        prepared(data, fresh_tokenizer, cache_dir)
    if cache_dir != "none":
        assert not list(cache_dir.iterdir())  # nothing cached, no partial folder
    assert not list((tmp_path / "scratch").iterdir())


@pytest.fixture
def deadline():
    """Fail a test still running after 60 s, instead of hanging (the preparation's own timers restore this one)."""

    def expired(signum, frame):
        pytest.fail("still running after 60 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 60)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_template_that_loops_stops_at_its_row(tmp_path, fresh_tokenizer, monkeypatch, deadline, num_proc):
    monkeypatch.setattr(prepare, "ROW_RENDER_SECONDS", 0.5)
    monkeypatch.setattr(prepare, "BATCH_RENDER_SECONDS", 1.0)
    monkeypatch.setattr(prepare, "BATCH_ROWS", 8)
    data = tmp_path / "train.jsonl"
    write_rows(data, 30, special={17: "LOOP"})
    fresh_tokenizer.chat_template = TEMPLATE
    started = time.monotonic()
    with pytest.raises(DataError) as raised:
        prepared(data, fresh_tokenizer, tmp_path / "cache", dataset_num_proc=num_proc)
    message = f"{data} line 17: the chat template took more than 0.5 s to render one row; it may loop forever"
    assert str(raised.value) == message
    assert time.monotonic() - started < 20
    assert not list((tmp_path / "cache").iterdir())
    assert signal.getsignal(signal.SIGALRM).__name__ == "expired"  # the deadline's handler and timer are back
    assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] < 60


def test_progress_is_shown_from_the_main_process(tmp_path, fresh_tokenizer, monkeypatch, capfd):
    data = tmp_path / "train.jsonl"
    write_rows(data, 40)
    monkeypatch.setattr(prepare, "BATCH_ROWS", 8)
    prepared(data, fresh_tokenizer, "none", dataset_num_proc=2)
    assert "rows prepared" not in capfd.readouterr().err  # a preparation of a second says nothing
    monkeypatch.setattr(prepare, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(prepare, "PROGRESS_EVERY", 0.0)
    prepared(data, fresh_tokenizer, "none", dataset_num_proc=2)
    lines = [line for line in capfd.readouterr().err.splitlines() if "rows prepared" in line]
    size = f"{data.stat().st_size / 1e6:,.0f} MB"
    # one line per batch of 8 rows, and from the parent only (a worker's would repeat a count)
    assert [re.sub(r"in \d+ s", "in N s", line) for line in lines] == [
        f"data: {rows} rows prepared in N s (the data files hold {size})" for rows in range(8, 41, 8)
    ]


# ----------------------------------------------------------------------------- interrupted preparations

STOPPED = """
import sys
from minisft.machinery import prepare
from minisft.machinery.config import DataConfig
from minisft.machinery.models import load_tokenizer

prepare.BATCH_ROWS = 2
tokenizer = load_tokenizer("smollm2-135m-instruct")
tokenizer.chat_template = {template!r}
try:
    prepare.load_and_prepare(sys.argv[1], tokenizer, DataConfig(cache_dir=sys.argv[2], dataset_num_proc=2))
except KeyboardInterrupt:  # as minisft.machinery.cli.run answers it: one quiet line
    print("interrupted", file=sys.stderr)
    sys.exit(130)
print("finished", file=sys.stderr)
"""


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the preparation's workers), from /proc/<pid>/stat's ppid field."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name: state, ppid, ...
        except OSError:  # a process that ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def group_is_gone(group: int) -> bool:
    """Whether every process of the group (the preparation and its workers) has ended, waiting up to 10 s."""
    for _ in range(100):
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_preparation_unwinds_cleanly(tmp_path, signal_number):
    """Ctrl-C as a terminal sends it, to the whole process group; SIGTERM as a scheduler does, to the run."""
    data, cache_dir, script = tmp_path / "train.jsonl", tmp_path / "cache", tmp_path / "stopped.py"
    # ~0.17 s a row: about 50 s on two workers (measured: 100 rows in 8.5 s), which the signal stops after ~5 s. At a
    # fifth of the spin, 600 rows took 10.5 s: too little margin.
    write_rows(data, 600, word="SLOW")
    script.write_text(textwrap.dedent(STOPPED.format(template=TEMPLATE)), encoding="utf-8")
    command = [sys.executable, str(script), str(data), str(cache_dir)]
    # A suite started as a background job without job control (`pytest &` in a script) runs with SIGINT ignored, and
    # a child inherits that (Python then installs no KeyboardInterrupt handler): the run would ignore the Ctrl-C this
    # test sends. A terminal's foreground process has the default disposition; the child is given it.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    run = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint
    )
    try:
        for _ in range(600):  # the partial folder appears once the tokenizer is loaded
            if list(cache_dir.glob(".partial-*")) or run.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(2)  # the workers are rendering
        if signal_number == signal.SIGINT:
            # A terminal sends Ctrl-C to the whole group at once. The workers get it first here, as the scheduler
            # may order it, so that a worker that did not ignore it would have the time to print its traceback.
            workers = children_of(run.pid)
            assert len(workers) == 2
            for worker in workers:
                os.kill(worker, signal.SIGINT)
            time.sleep(1)
            os.killpg(run.pid, signal.SIGINT)
        else:
            os.kill(run.pid, signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "Traceback" not in stderr and "finished" not in stderr, stderr
    assert run.returncode == (130 if signal_number == signal.SIGINT else -signal.SIGTERM)
    assert not list(cache_dir.iterdir())  # no partial folder, and nothing cached
    assert group_is_gone(run.pid)  # no worker left running


def test_any_abandoned_partial_folder_is_removed(data, fresh_tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead, alive = 999_999_999, os.getpid()  # above Linux's largest pid (4,194,304): no such process
    abandoned = cache_dir / f".partial-{'a' * 24}-{cache.HOST}-{dead}"  # another dataset's, killed outright
    running = cache_dir / f".partial-{'b' * 24}-{cache.HOST}-{alive}"
    elsewhere = cache_dir / f".partial-{'c' * 24}-another-machine-{dead}"  # a pid of another host means nothing
    for folder in (abandoned, running, elsewhere):
        (folder / "train").mkdir(parents=True)
    prepared(data, fresh_tokenizer, cache_dir)
    assert not abandoned.exists() and running.exists() and elsewhere.exists()
