"""Fixtures shared by test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import M2BertConfig, M2BertModel


@pytest.fixture(scope="session")
def tiny_m2(tmp_path_factory) -> Path:
    """A randomly initialised `m2-bert-tiny` export (512 positions, masked padding), seed 0."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "tiny-m2"
    M2BertModel(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(directory)
    return directory
