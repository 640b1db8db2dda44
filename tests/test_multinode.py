"""Past one machine (issue 12 point 3): two "nodes" on localhost give the result of one node with two processes.

Each script is launched twice with gloo on CPU: once as one node with two processes, once as two nodes of one
process each (two launchers started side by side, as two machines of a cluster would start them, the second
pointing at the first). The two-node run must give the same result: the same generations and metrics
(run_distributed_eval.py, torchrun), the same evaluation (run_glue.py, Trainer, torchrun) and the same trained
adapter (gpt2_ft.py, accelerate launch). Both "nodes" share the output folder, as nodes of a cluster share a
filesystem; the results are written by global rank 0 only. The recipes are in docs/multinode.md.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA_DIR, GLUE_DIR, REPO, free_port, tiny_bert_config, tiny_gpt2_config
from safetensors.torch import load_file

from bench.bench_distributed_eval import save_random_bart

WMT_DIR = DATA_DIR / "seq2seq" / "wmt_en_ro"
E2E_DEVSET = DATA_DIR / "e2e" / "original" / "devset.csv"
TIMEOUT = 300  # per launch; a hang fails instead of blocking the suite


def node_env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", GLUE_DIR=str(GLUE_DIR), **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_nodes(launchers, script_args, log_dir, env):
    """Start one launcher per node side by side (node 0 first) and wait for all; each node's output to a log."""
    procs, logs = [], []
    try:
        for i, launcher in enumerate(launchers):
            log = open(log_dir / f"node{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([*launcher, *map(str, script_args)], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, text=True))
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = []
    for log, proc in zip(logs, procs, strict=True):
        log.seek(0)
        outputs.append(log.read())
        log.close()
        assert proc.returncode == 0, outputs[-1][-3000:]
    return outputs


def torchrun_one_node(port):
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", port]]


def torchrun_two_nodes(port):
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port] for rank in (0, 1)]


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


def accelerate_one_node(port):
    return [[*ACCELERATE, "--num_machines", "1", "--num_processes", "2", "--main_process_port", port]]


def accelerate_two_nodes(port):
    return [[*ACCELERATE, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "--num_processes", "2"] for rank in (0, 1)]


# ---------------------------------------------------------------------------------------------------------------


def test_run_distributed_eval_on_two_nodes(tmp_path):
    (tmp_path / "bart").mkdir()
    model = save_random_bart(tmp_path / "bart", d_model=16, layers=1, init_std=0.5)
    flags = ["run_distributed_eval.py", "--model_name", model, "--data_dir", WMT_DIR, "--type_path", "val",
             "--task", "translation", "--n_obs", 10, "--bs", 3, "--max_length=10"]
    env = node_env()
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run_nodes(torchrun_one_node(free_port()), [*flags, "--save_dir", tmp_path / "one" / "out"], tmp_path / "one", env)
    node0, node1 = run_nodes(torchrun_two_nodes(free_port()), [*flags, "--save_dir", tmp_path / "two" / "out"],
                             tmp_path / "two", env)
    one, two = (json.loads((tmp_path / run / "out" / "val_bleu.json").read_text()) for run in ("one", "two"))
    assert two["n_gpus"] == two["num_processes"] == one["n_gpus"] == 2
    assert two["n_obs"] == one["n_obs"] == 10 and two["bleu"] == one["bleu"]
    assert ((tmp_path / "two" / "out" / "val_generations.txt").read_text()
            == (tmp_path / "one" / "out" / "val_generations.txt").read_text())
    assert "val_bleu.json" in node0 and "val_bleu.json" not in node1  # global rank 0 (node 0) writes the results


def test_run_glue_on_two_nodes(tmp_path, minilm_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = tmp_path / "tiny_bert"
    BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
                                  ).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(model)
    flags = ["run_glue.py", "--model_name_or_path", model, "--task_name", "mrpc", "--adapter_name", "lora",
             "--rank", 4, "--learning_rate", 5e-3, "--num_train_epochs", 1, "--max_train_samples", 32,
             "--max_eval_samples", 16, "--per_device_train_batch_size", 4, "--seed", 1, "--do_train", "--do_eval",
             "--report_to", "none", "--disable_tqdm", "true"]
    env = node_env()
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run_nodes(torchrun_one_node(free_port()), [*flags, "--output_dir", tmp_path / "one" / "out"],
              tmp_path / "one", env)
    run_nodes(torchrun_two_nodes(free_port()), [*flags, "--output_dir", tmp_path / "two" / "out"],
              tmp_path / "two", env)
    one, two = (json.loads((tmp_path / run / "out" / "eval_results.json").read_text()) for run in ("one", "two"))
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    adapters = [load_file(str(tmp_path / run / "out" / "adapter.safetensors")) for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    for key, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], tensor, atol=1e-6, rtol=1e-5)


def test_gpt2_ft_on_two_nodes(tmp_path, gpt2_tokenizer):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = tmp_path / "tiny_gpt2"
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(model)
    gpt2_tokenizer.save_pretrained(model)
    flags = ["gpt2_ft.py", "--train_data", E2E_DEVSET, "--model_name_or_path", model, "--max_train_examples", 16,
             "--max_epoch", 1, "--train_batch_size", 4, "--lr", 0.01, "--warmup_step", 0]
    env = node_env(ACCELERATE_USE_CPU="1")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run_nodes(accelerate_one_node(free_port()), [*flags, "--work_dir", tmp_path / "one" / "out"],
              tmp_path / "one", env)
    run_nodes(accelerate_two_nodes(free_port()), [*flags, "--work_dir", tmp_path / "two" / "out"],
              tmp_path / "two", env)
    one, two = (json.loads((tmp_path / run / "out" / "train_results.json").read_text()) for run in ("one", "two"))
    assert two["step"] == one["step"] == 2  # 16 rows / (2 processes x 4)
    adapters = [load_file(str(tmp_path / run / "out" / "final" / "adapter.safetensors")) for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    assert any(t.abs().max() > 0 for k, t in adapters[0].items() if "lora_B" in k)  # training moved the adapter
    for key, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], tensor, atol=1e-6, rtol=1e-5)
