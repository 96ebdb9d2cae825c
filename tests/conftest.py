"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built on it."""

import pytest

from minisft.models import load_tokenizer, tiny_model


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
