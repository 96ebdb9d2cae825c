"""Data preparation at scale: minisft (cold and warm cache, 1 and 2 processes, and the default) against TRL.

    python benchmarks/prepare_speed.py --conversations 40000             # synthetic, TRL included
    python benchmarks/prepare_speed.py --conversations 1000000 --no-trl --processes 2  # a million
    python benchmarks/prepare_speed.py --corpus openai-evals --out benchmarks/results/prepare_real_corpus.json
    python benchmarks/prepare_speed.py --corpus openai-evals --conversations 3000 --profile  # where time goes

Each measurement runs in a process of its own (its peak RSS is its own, imports included):

- minisft: load_and_prepare + pack (bfd, max_length 1024), the data side of `python -m
  minisft.train` up to its first step; cold with an empty cache, with --dataset_num_proc 1 and 2
  (--processes) and with DataConfig's default (no --dataset_num_proc: one process under 8 MB of
  data, else one per core, at most 8), the row the issue's target is set for; warm with the cache
  the first cold run left;
- TRL 1.16: SFTTrainer constructed over datasets.load_dataset("json") with packing (bfd) on a
  tiny model: its whole data preparation; warm reuses datasets' Arrow cache.

The corpus (--corpus), written once as JSONL before the measurements:

- synthetic (the default, 40,000 conversations): SmolLM2-style chats of 1 to 3 turns, lognormal
  lengths (median ~180 tokens).
- openai-evals (20,000 by default, the size of the issue's held-back corpus): real chats. OpenAI's
  `evals` wheel on PyPI (evals==3.0.1.post1, MIT, 46 MB) ships 660 JSONL files (753 MB) of eval
  samples under evals/registry/data, most of them {"input": [messages], "ideal": answer}. pip
  downloads the wheel once into --corpus_cache; the files are read straight from its zip. A
  sample whose input is a non-empty list of system/user/assistant messages with string content,
  and whose ideal is a non-empty string (or a list whose first item is one), becomes
  {"messages": input + [{"role": "assistant", "content": ideal}]}; each message keeps only its
  role and content (evals' few-shot messages carry a "name", counted as left out). The samples are
  read round-robin, one from each file in turn (files sorted by name), so the set is diverse and
  always the same; those that do not convert are skipped and counted by reason.

--profile measures instead where a cold preparation's time goes, for minisft (1 process, in the
child's own process) and TRL: timers wrapped from here (monkeypatched, minisft is not edited)
around the functions of each stage: reading and parsing, normalising rows, chat-template
rendering (and within it Jinja's render_jinja_template), the tokenizer calls, label masking,
writing and sealing the cache, packing; for TRL, load_dataset and each Dataset.map by its
description (with the Jinja and tokenizer time inside them). A wrapper costs ~1 us a call.

Timings on a shared machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

WORDS = "the model learns to answer questions about data files tokens memory cache speed and more".split()
DEFAULT_CONVERSATIONS = {"synthetic": 40_000, "openai-evals": 20_000}
EVALS_REQUIREMENT = "evals==3.0.1.post1"
EVALS_WHEELS = "evals-3.0.1.post1-*.whl"
EVALS_DATA = "evals/registry/data/"
ROLES = ("system", "user", "assistant")


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(count):
            messages = []
            for _ in range(rng.randint(1, 3)):
                question = " ".join(rng.choices(WORDS, k=max(3, int(rng.lognormvariate(3.0, 0.6)))))
                answer = " ".join(rng.choices(WORDS, k=max(3, int(rng.lognormvariate(4.2, 0.8)))))
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            file.write(json.dumps({"messages": messages}) + "\n")


# ----------------------------------------------------------------------------- the real corpus: OpenAI's evals


def evals_wheel(cache: Path) -> Path:
    """The evals wheel in `cache`, which pip downloads the first time."""
    if not any(cache.glob(EVALS_WHEELS)):
        cache.mkdir(parents=True, exist_ok=True)
        download = ["pip", "download", "--no-deps", "--quiet", EVALS_REQUIREMENT, "-d", str(cache)]
        subprocess.run([sys.executable, "-m", *download], check=True)
    return min(cache.glob(EVALS_WHEELS))


def evals_conversation(line: str) -> tuple[dict | None, str | None, list[str]]:
    """An evals sample as {"messages": [...]}, or None and why it does not convert; and the message keys left out."""
    try:
        sample = json.loads(line)
    except json.JSONDecodeError:
        return None, "not valid JSON", []
    messages = sample.get("input") if isinstance(sample, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return None, "input is not a list of messages (a prompt string)", []
    if not all(message.get("role") in ROLES for message in messages):
        return None, "a role other than system, user, assistant", []
    if not all(isinstance(message.get("content"), str) for message in messages):
        return None, "a message whose content is not a string", []
    ideal = sample.get("ideal")
    ideal = (ideal or [None])[0] if isinstance(ideal, list) else ideal
    if not isinstance(ideal, str) or not ideal:
        return None, "no ideal answer (a non-empty string)", []
    turns = [{"role": message["role"], "content": message["content"]} for message in messages]
    left_out = [key for message in messages for key in message if key not in ("role", "content")]
    return {"messages": [*turns, {"role": "assistant", "content": ideal}]}, None, left_out


def lines_of(wheel: zipfile.ZipFile, name: str):
    """The non-blank lines of one JSONL file of the wheel, decompressed as they are read."""
    with wheel.open(name) as member:
        yield from (line for line in io.TextIOWrapper(member, encoding="utf-8") if line.strip())


def write_evals_conversations(path: Path, count: int, cache: Path) -> dict:
    """Write `count` conversations of the evals corpus to `path`, one sample read from each file in turn; what was
    read, taken and skipped."""
    taken, skipped, left_out, written = Counter(), Counter(), Counter(), 0
    with zipfile.ZipFile(evals_wheel(cache)) as wheel, open(path, "w", encoding="utf-8") as out:
        names = sorted(name for name in wheel.namelist() if name.startswith(EVALS_DATA) and name.endswith(".jsonl"))
        files = {name: lines_of(wheel, name) for name in names}
        try:
            while files and written < count:
                for name in list(files):
                    line = next(files[name], None)
                    if line is None:  # this file is used up: the others go on
                        del files[name]
                        continue
                    conversation, problem, keys = evals_conversation(line)
                    if problem is not None:
                        skipped[problem] += 1
                        continue
                    out.write(json.dumps(conversation, ensure_ascii=False) + "\n")
                    left_out.update(keys)
                    taken[name] += 1
                    written += 1
                    if written == count:
                        break
        finally:
            for lines in files.values():
                lines.close()
    if written < count:
        raise SystemExit(f"the evals corpus holds only {written:,} conversations that convert; ask for fewer")
    return {
        "source": EVALS_REQUIREMENT,
        "files": len(names),
        "files_contributing": len(taken),
        "conversations": written,
        "skipped": dict(skipped.most_common()),
        "message_keys_left_out": dict(left_out),
        "most_from_one_file": max(taken.values()),
    }


def corpus_line(stats: dict) -> str:
    skipped = ", ".join(f"{reason}: {count:,}" for reason, count in stats["skipped"].items()) or "none"
    keys = ", ".join(f"{key!r} in {count:,} messages" for key, count in stats["message_keys_left_out"].items())
    return (
        f"{stats['source']}: {stats['conversations']:,} conversations from {stats['files_contributing']} of its "
        f"{stats['files']} JSONL files (at most {stats['most_from_one_file']} from one); "
        f"{sum(stats['skipped'].values()):,} samples skipped ({skipped}); left out: {keys or 'nothing'}"
    )


# ----------------------------------------------------------------------------- the measurements


def run_minisft(data: Path, cache_dir: Path, processes: int | None) -> dict:
    from minisft.machinery import prepare
    from minisft.machinery.config import DataConfig, PackingConfig
    from minisft.machinery.models import load_tokenizer
    from minisft.machinery.pack_plans import pack_prepared

    # what --dataset_num_proc resolved to (the default decides by the data's size and the cores), as preparation
    # itself decided it; a warm run prepares nothing and decides nothing
    resolved, resolve = [], prepare._processes

    def recorded(asked, streams):
        resolved.append(resolve(asked, streams))
        return resolved[-1]

    prepare._processes = recorded
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    start = time.perf_counter()
    given = {} if processes is None else {"dataset_num_proc": processes}
    config = DataConfig(dataset_name=str(data), max_length=1024, cache_dir=str(cache_dir), **given)
    splits = prepare.load_and_prepare(str(data), tokenizer, config, PackingConfig(packing=True))
    packed = pack_prepared(splits.train.examples, 1024, "bfd")
    first_row = packed.rows[0]  # the first step's data, read from the storage
    stats = splits.train.stats
    return {
        "seconds": time.perf_counter() - start,
        "processes": resolved[0] if resolved else None,
        "rows": packed.stats.rows,
        "tokens": packed.stats.tokens,
        "examples": stats.examples,
        "truncated": stats.truncated,
        "truncated_tokens": stats.truncated_tokens,
        "dropped": stats.dropped,
        "first_row_tokens": len(first_row["input_ids"]),
        "note": splits.cache_note,
    }


def run_trl(data: Path, cache_dir: Path) -> dict:
    import datasets
    import trl

    from minisft.machinery.models import load_tokenizer, tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache_dir))
    with tempfile.TemporaryDirectory() as output_dir:
        args = trl.SFTConfig(
            output_dir=output_dir, report_to="none", use_cpu=True, max_length=1024, packing=True,
            packing_strategy="bfd", dataset_num_proc=None,
        )  # fmt: skip
        model = tiny_model(tokenizer)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return {"seconds": time.perf_counter() - start, "rows": len(trainer.train_dataset)}


# ----------------------------------------------------------------------------- --profile: where the time goes

SPENT: Counter = Counter()  # stage -> seconds inside the functions wrapped for it
CALLS: Counter = Counter()
NESTED = "of which"  # a stage whose time is inside another's: shown, not added up


def timed(function, stage: str):
    """`function`, its time added to SPENT[stage]."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[stage] += time.perf_counter() - start
            CALLS[stage] += 1

    return wrapper


def timed_generator(function, stage: str):
    """A generator function, the time of each of its steps added to SPENT[stage] (not its consumer's time)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        items, end = function(*args, **kwargs), object()
        CALLS[stage] += 1
        while True:
            start = time.perf_counter()
            item = next(items, end)
            SPENT[stage] += time.perf_counter() - start
            if item is end:
                return
            yield item

    return wrapper


def profile_minisft(data: Path, cache_dir: Path) -> dict:
    """A cold preparation in one process, with each stage's functions timed."""
    import transformers.tokenization_utils_base as tokenization

    from minisft.machinery import cache, data_files, pack_plans, prepare, storage
    from minisft.sft import chat_template

    data_files.READERS[".jsonl"] = timed_generator(data_files.READERS[".jsonl"], "reading and parsing the JSONL")
    for name in ("check_same_format", "normalize_example"):
        setattr(prepare, name, timed(getattr(prepare, name), "checking and normalising rows (examples.py)"))
    chat_template._render = timed(chat_template._render, "chat-template rendering (_render)")
    jinja = f"{NESTED} Jinja (render_jinja_template)"
    tokenization.render_jinja_template = timed(tokenization.render_jinja_template, jinja)
    chat_template._encode = timed(chat_template._encode, "tokenizer calls (_encode)")
    prepare._finish_example = timed(prepare._finish_example, "label masking, truncation, counts (_finish_example)")
    prepare._encoded = timed(prepare._encoded, "laying batches out in arrays (_encoded)")
    for name in ("append", "finish"):
        method = getattr(storage.StorageWriter, name)
        setattr(storage.StorageWriter, name, timed(method, "writing the cache files (StorageWriter)"))
    cache.seal = timed(cache.seal, "sealing the cache (sha256 manifest)")
    cache.fingerprint = timed(cache.fingerprint, "fingerprinting the inputs (cache key)")
    prepare._opened = timed(prepare._opened, "opening the prepared split (_opened)")
    pack_plans.pack_prepared = timed(pack_plans.pack_prepared, "packing (pack_prepared)")
    return {**run_minisft(data, cache_dir, processes=1), "stages": dict(SPENT), "calls": dict(CALLS)}


def profile_trl(data: Path, cache_dir: Path) -> dict:
    """TRL's cold preparation, with load_dataset, each Dataset.map (by its description) and Jinja and the tokenizer
    within them timed."""
    import datasets
    import transformers.tokenization_utils_base as tokenization

    datasets.load_dataset = timed(datasets.load_dataset, "load_dataset (JSON to Arrow)")
    map_rows = datasets.Dataset.map

    def map_timed(self, *args, **kwargs):
        return timed(map_rows, f"Dataset.map: {kwargs.get('desc') or 'no description'}")(self, *args, **kwargs)

    datasets.Dataset.map = map_timed
    jinja = f"{NESTED} Jinja (render_jinja_template)"
    tokenization.render_jinja_template = timed(tokenization.render_jinja_template, jinja)
    call = tokenization.PreTrainedTokenizerBase.__call__
    tokenization.PreTrainedTokenizerBase.__call__ = timed(call, f"{NESTED} tokenizer calls (tokenizer.__call__)")
    return {**run_trl(data, cache_dir), "stages": dict(SPENT), "calls": dict(CALLS)}


def report_profile(name: str, profile: dict) -> None:
    total = profile["seconds"]
    print(f"\n{name}: {total:.2f} s from the tokenizer loaded to the data ready")
    print("| stage | seconds | share | calls |")
    print("|---|---|---|---|")
    for stage, seconds in profile["stages"].items():
        print(f"| {stage} | {seconds:.2f} | {seconds / total:.0%} | {profile['calls'][stage]:,} |")
    accounted = sum(seconds for stage, seconds in profile["stages"].items() if not stage.startswith(NESTED))
    print(f"| the rest | {total - accounted:.2f} | {(total - accounted) / total:.0%} | |")


# ----------------------------------------------------------------------------- each mode in a process of its own


def measure(mode: str, data: Path, cache_dir: Path) -> dict:
    """Run one mode in a child process; its result and its peak RSS."""
    command = [sys.executable, __file__, "--child", mode, "--data", str(data), "--cache", str(cache_dir)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def child(mode: str, data: Path, cache_dir: Path) -> None:
    if mode == "profile-minisft":
        result = profile_minisft(data, cache_dir)
    elif mode == "profile-trl":
        result = profile_trl(data, cache_dir)
    elif mode.startswith("trl"):
        result = run_trl(data, cache_dir)
    else:
        processes = mode.rsplit("-", 1)[1]
        result = run_minisft(data, cache_dir, processes=None if processes == "default" else int(processes))
    # this process's peak plus its largest worker's (forked workers share pages, so this overcounts a little)
    usage = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak_kb = sum(usage)
    result["peak_rss_mb"] = peak_kb / 1024
    print(json.dumps(result))


def measure_all(args, data: Path, work: Path) -> dict:
    """The comparison: minisft cold (each --processes and the default), warm, and TRL cold and warm."""
    results = {}
    for processes in args.processes:
        cache_dir = work / f"cache-{processes}"
        results[f"minisft cold, {processes} process(es)"] = measure(f"minisft-{processes}", data, cache_dir)
    default = measure("minisft-default", data, work / "cache-default")
    results[f"minisft cold, default --dataset_num_proc ({default['processes']} process(es))"] = default
    print(tokens_line(default), flush=True)
    warm = args.processes[0]
    results["minisft warm"] = measure(f"minisft-{warm}", data, work / f"cache-{warm}")
    if not args.no_trl:
        results["TRL cold"] = measure("trl-cold", data, work / "trl-cache")
        results["TRL warm"] = measure("trl-warm", data, work / "trl-cache")
    report(results)
    return results


def tokens_line(result: dict) -> str:
    uncut = result["tokens"] + result["truncated_tokens"]
    return (
        f"prepared: {result['examples']:,} conversations, {result['tokens']:,} tokens after SmolLM2's template "
        f"(mean {result['tokens'] / result['examples']:,.0f} a conversation; {uncut / result['examples']:,.0f} before "
        f"{result['truncated']:,} were cut to 1024, {result['truncated_tokens']:,} tokens cut), "
        f"{result['dropped']:,} dropped"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=sorted(DEFAULT_CONVERSATIONS), default="synthetic")
    parser.add_argument("--corpus_cache", type=Path, default=Path.home() / ".cache" / "minisft-bench",
                        help="where the openai-evals wheel is downloaded once")  # fmt: skip
    parser.add_argument("--conversations", type=int, help="default: 40,000 synthetic, 20,000 openai-evals")
    parser.add_argument("--no-trl", action="store_true", help="minisft only (the million-conversation run)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="minisft's --dataset_num_proc runs")
    parser.add_argument("--profile", action="store_true", help="where a cold preparation's time goes, not the runs")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--child")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.cache)
        return
    conversations = args.conversations or DEFAULT_CONVERSATIONS[args.corpus]
    work = Path(tempfile.mkdtemp(prefix="prepare-speed-"))
    try:
        data = work / "conversations.jsonl"
        figures = {"command": " ".join(sys.argv), "load_average": os.getloadavg(), "corpus": args.corpus}
        if args.corpus == "openai-evals":
            figures["corpus_stats"] = write_evals_conversations(data, conversations, args.corpus_cache)
            print(corpus_line(figures["corpus_stats"]))
        else:
            write_conversations(data, conversations)
        figures["jsonl_mb"] = data.stat().st_size / 1e6
        print(f"{conversations:,} conversations, {figures['jsonl_mb']:.1f} MB of JSONL", flush=True)
        if args.profile:
            figures["profile"] = {"minisft": measure("profile-minisft", data, work / "profile-cache")}
            print(tokens_line(figures["profile"]["minisft"]))
            report_profile("minisft, cold, 1 process", figures["profile"]["minisft"])
            if not args.no_trl:
                figures["profile"]["TRL"] = measure("profile-trl", data, work / "profile-trl-cache")
                report_profile("TRL, cold", figures["profile"]["TRL"])
        else:
            figures["results"] = measure_all(args, data, work)
        if args.out:
            args.out.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict) -> None:
    base = results.get("TRL cold") or next(iter(results.values()))
    base_name = "TRL cold" if "TRL cold" in results else next(iter(results))
    print(f"| | time | peak RSS | rows | time / {base_name} | RSS / {base_name} |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {result['seconds']:.1f} s | {result['peak_rss_mb']:,.0f} MB | {result['rows']:,} | "
            f"{result['seconds'] / base['seconds']:.2f} | {result['peak_rss_mb'] / base['peak_rss_mb']:.2f} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
