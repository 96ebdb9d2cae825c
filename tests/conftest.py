"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built on it (in memory and on disk)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from minisft.machinery.models import load_tokenizer, tiny_model

from .tiny_runs import data_file_of, write_conversations


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2-135M-Instruct tokenizer (converted once from the GGUF, then cached)."""
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def fresh_tokenizer():
    """A tokenizer a test may modify (chat template, special tokens) without touching the shared one."""
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def tiny(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A folder with `tiny_model` and the tokenizer, to train: the ten conversations of tests/tiny_runs.py are in
    the file beside it (`data_file_of`)."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    write_conversations(data_file_of(folder / "model"))
    return str(folder / "model")


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory, tokenizer):
    """A folder with a tiny random model that says something, to chat with. With tied embeddings (`tiny_dir`'s
    model) a random model's likeliest next token is the one it just read, so it would answer only newlines; an
    untied head does not."""
    config = tiny_model(tokenizer).config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("chatty")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matmuls are too small to share: on a busy 2-core machine, OpenMP threads waiting
    for each other made each forward pass ~40x slower (0.4 s instead of 0.01 s). Restored afterwards.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
