"""GLUE fidelity: the source tools' commands run as written (only model and data paths changed) and mean the same
experiment. microsoft/LoRA's NLU evaluation command under `python -m torch.distributed.launch`, RandLoRA's README /
train_all.sh command, and the recipe each flag set settles (alpha, targets, warm-up, eps, seeds)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import GLUE_DIR, REPO, tiny_roberta_config
from safetensors.torch import load_file
from test_glue import MNLI_DEV, fake_mnli, save_tiny, write_tsv

import glue_data
import peft_layers
import run_glue
from common import run_main

PY = sys.executable


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A tiny random RoBERTa saved under the Hub name the commands use (3 labels, as an MNLI model)."""
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_roberta_config(num_labels=3, type_vocab_size=2))
    return save_tiny(tmp_path_factory.mktemp("models") / "roberta-base", model)


def loralib_checkpoint(model, path, rank=8, seed=1):
    """A microsoft/LoRA checkpoint (loralib.lora_state_dict + the trained classifier, like its
    roberta_base_lora_mnli.bin): lora_A (r x in) and lora_B (out x r) of every query and value projection."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in model.named_modules():
        if name.endswith(("attention.self.query", "attention.self.value")):
            sd[f"{name}.lora_A"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            sd[f"{name}.lora_B"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    for key, value in model.state_dict().items():
        if key.startswith("classifier."):
            sd[key] = value + 0.3 * torch.randn(value.shape, generator=g)
    torch.save(sd, path)
    return sd


def expected_mnli_metrics(model_dir, sd, alpha, rank, rows):
    """Loss and accuracy of the base model with W + alpha/r * B A merged by hand (loralib's scaling)."""
    from transformers import AutoTokenizer, RobertaForSequenceClassification

    model = RobertaForSequenceClassification.from_pretrained(model_dir).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".lora_A")]:
            layer = key[: -len(".lora_A")]
            params[f"{layer}.weight"] += alpha / rank * sd[f"{layer}.lora_B"] @ sd[key]
        for key in [k for k in sd if k.startswith("classifier.")]:
            params[key].copy_(sd[key])
        tok = AutoTokenizer.from_pretrained(model_dir)
        batch = tok(list(rows["sentence1"]), list(rows["sentence2"]), truncation=True, max_length=128,
                    padding=True, return_tensors="pt")
        logits = model(**batch).logits
    labels = torch.tensor(list(rows["label"]))
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(-1) == labels).float().mean().item()


MISMATCHED = [[i, 2000 + i, f"{i}m", "travel", "( x )", "( y )", "(ROOT x)", "(ROOT y)", f"A dog ran {i} miles.",
               f"The dog {['ran', 'sat', 'slept'][i % 2]}.", *[glue_data.TASKS["mnli"].labels[i % 3]] * 6]
              for i in range(10)]


def launch_on_fake_mnli(tmp_path, *script_args):
    """`python -m torch.distributed.launch --nproc_per_node=1 run_glue.py ARGS` in tmp_path, GLUE_DIR a small MNLI."""
    glue = tmp_path / "glue"
    fake_mnli(glue, n=24)
    write_tsv(glue / "MNLI" / "dev_mismatched.tsv", MNLI_DEV, MISMATCHED)
    env = dict(os.environ, GLUE_DIR=str(glue), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [PY, "-m", "torch.distributed.launch", "--nproc_per_node=1", str(REPO / "run_glue.py"),
               *map(str, script_args)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_microsoft_lora_eval_command_runs_as_written(roberta_dir, tmp_path):
    from transformers import RobertaForSequenceClassification

    sd = loralib_checkpoint(RobertaForSequenceClassification.from_pretrained(roberta_dir), tmp_path / "lora_weights.pt")
    proc = launch_on_fake_mnli(tmp_path, "--model_name_or_path", roberta_dir, "--task_name", "mnli", "--do_eval",
                               "--apply_lora", "--lora_r", "8", "--lora_alpha", "16",
                               "--lora_path", "./lora_weights.pt")
    glue = tmp_path / "glue"

    out = tmp_path / "glue_output" / "mnli_lora8"  # no --output_dir: the default, and the run says where
    assert "no --output_dir given: results go to glue_output/mnli_lora8" in proc.stderr
    setup_lines = [line for line in proc.stderr.splitlines() if "setup (microsoft/LoRA run_glue.py flags)" in line]
    assert len(setup_lines) == 1 and "lora (ours) r 8 alpha 16 scale alpha/r = 2" in setup_lines[0]
    setup = json.loads((out / "adapter_setup.json").read_text())
    assert (setup["method"], setup["rank"], setup["alpha"], setup["scale"]) == ("lora", 8, 16.0, 2.0)
    assert setup["target_modules"] == ["query", "value"] and setup["dropout"] == 0.0
    assert setup["head_modules"] == ["classifier"]

    # The meaning: the evaluated model is the base model plus (16 / 8) * B A and the checkpoint's classifier.
    dev = glue_data.load_glue("mnli", ["validation"], glue_dir=glue)
    for split, name in (("validation_matched", "eval_results_mnli.json"),
                        ("validation_mismatched", "eval_results_mnli-mm.json")):
        loss, accuracy = expected_mnli_metrics(roberta_dir, sd, 16, 8, dev[split])
        results = json.loads((out / name).read_text())
        assert results["eval_loss"] == pytest.approx(loss, abs=1e-4)
        assert results["eval_accuracy"] == pytest.approx(accuracy)
    both = json.loads((out / "eval_results.json").read_text())
    assert both["eval_samples"] == 12 and both["eval_samples_mm"] == 10
    assert both["eval_accuracy_mm"] == json.loads((out / "eval_results_mnli-mm.json").read_text())["eval_accuracy"]


def test_microsoft_lora_training_script_runs_as_written(roberta_dir, tmp_path):
    """examples/NLU/roberta_base_mnli.sh's flags as written (30 epochs and 512 tokens cut by flags added at the
    end): the older Trainer flags it passes (--logging_dir, --warmup_ratio, --evaluation_strategy) and its fork's
    (--cls_dropout, --use_deterministic_algorithms, from the DeBERTa scripts) keep their meaning."""
    launch_on_fake_mnli(
        tmp_path, "--model_name_or_path", roberta_dir, "--task_name", "mnli", "--do_train", "--do_eval",
        "--max_seq_length", "512", "--per_device_train_batch_size", "16", "--learning_rate", "5e-4",
        "--num_train_epochs", "30", "--output_dir", "./mnli/model", "--overwrite_output_dir",
        "--logging_steps", "10", "--logging_dir", "./mnli/log", "--evaluation_strategy", "epoch",
        "--save_strategy", "epoch", "--warmup_ratio", "0.06", "--apply_lora", "--lora_r", "8",
        "--lora_alpha", "16", "--seed", "0", "--weight_decay", "0.1",
        "--cls_dropout", "0.15", "--use_deterministic_algorithms",
        "--num_train_epochs", "2", "--max_seq_length", "128")  # the tiny model: 130 positions
    setup = json.loads((tmp_path / "mnli" / "model" / "adapter_setup.json").read_text())
    assert (setup["method"], setup["rank"], setup["alpha"]) == ("lora", 8, 16.0)
    # 24 rows in batches of 16, 2 epochs: 4 steps; a 0.06 warm-up ratio rounds up to 1 step, as before
    assert "--warmup_steps 0.06" in setup["warmup"]
    assert list((tmp_path / "mnli" / "log").glob("events.out.tfevents.*"))  # TensorBoard logs where it said
    config = json.loads(next((tmp_path / "mnli" / "model").glob("checkpoint-*/config.json")).read_text())
    assert config["cls_dropout"] == 0.15


RANDLORA_COMMAND = ("--model_name_or_path {model} --task_name sst2 --do_train --do_eval --max_seq_length 128 "
                    "--per_device_train_batch_size 64 --learning_rate 1e-4 --num_train_epochs 10 "
                    "--output_dir finetuned_results/randlora64/1/sst2/ --fp16 --adapter_name randlora --rank 64 "
                    "--seed 1").split()
SHRINK = ["--max_train_samples", "128", "--max_eval_samples", "64", "--logging_steps", "1", "--disable_tqdm", "true",
          "--report_to", "none"]  # fewer rows only; every flag of the command stays


def randlora_lr(step, total=20, base=1e-4):
    """RandLoRA's schedule: get_linear_schedule_with_warmup(warm-up 0.06 T, T), T = rows // batch * epochs."""
    warmup = 0.06 * total
    return base * (step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup)))


def test_randlora_command_runs_as_written_with_its_recipe(tiny_roberta_sst2, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLUE_DIR", str(GLUE_DIR))
    argv = [a.format(model=tiny_roberta_sst2) for a in RANDLORA_COMMAND] + SHRINK
    run_main(lambda: run_glue.main(argv))
    err = capsys.readouterr().err
    fp16 = [line for line in err.splitlines() if "--fp16" in line and line.startswith("warning:")]
    assert len(fp16) == 1 and "computes in fp32" in fp16[0] and "Traceback" not in err
    assert sum(r.getMessage().startswith("setup (RandLoRA run_glue.py flags): randlora (ours) r 64 alpha 128 ")
               for r in caplog.records) == 1

    out = tmp_path / "finetuned_results" / "randlora64" / "1" / "sst2"
    setup = json.loads((out / "adapter_setup.json").read_text())
    # alpha = 2 x rank; the fork's scale alpha / r / sqrt(n) with n = ceil(min(32, 32) / 64) = 1 basis
    assert (setup["nominal_alpha"], setup["scaling"], setup["scale"]) == (128, "alpha/r/sqrt(n)", 2.0)
    assert setup["projection_seed"] == 8 == int(math.exp(1) * 3.1415) and setup["dropout"] == 0.0
    targets = setup["target_modules"]  # query key value dense of both layers; the head's dense is trained whole
    assert len(targets) == 12 and all(t.rsplit(".", 1)[-1] in ("query", "key", "value", "dense") for t in targets)
    assert not any(t.startswith("classifier") for t in targets) and setup["head_modules"] == ["classifier"]
    assert setup["optimizer"] == "AdamW(betas=(0.9, 0.999), eps=1e-06, weight_decay=0)"
    assert setup["warmup"].startswith("RandLoRA's: linear warm-up over 6% of 20 steps (1.2)")
    assert setup["evaluation"] == "once, after the last epoch" and setup["precision"].startswith("fp32 (--fp16")

    checkpoint = out / "checkpoint-20"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    lrs = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert sorted(lrs) == list(range(1, 21))
    for step, lr in lrs.items():  # the Trainer logs the rate that step `step` used: the schedule after step - 1
        assert lr == pytest.approx(randlora_lr(step - 1), rel=1e-6, abs=1e-12), step
    assert not any(k.startswith("eval_") for e in state["log_history"] for k in e)  # no per-epoch evaluation
    groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    assert {(g["eps"], g["weight_decay"]) for g in groups} == {(1e-6, 0.0)}

    results = json.loads((out / "eval_results.json").read_text())
    assert results["epoch"] == 10.0 and results["eval_samples"] == 64 and 0 <= results["eval_accuracy"] <= 1
    saved = json.loads((out / "adapter.json").read_text())
    assert (saved["method"], saved["rank"], saved["alpha"], saved["seed"]) == ("randlora", 64, 128.0, 8)
    head = load_file(str(out / "adapter.safetensors"))
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= set(head)


@pytest.fixture(scope="module")
def tiny_roberta_sst2(tmp_path_factory):
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    return save_tiny(tmp_path_factory.mktemp("models") / "FacebookAI-roberta-base",
                     RobertaForSequenceClassification(tiny_roberta_config(type_vocab_size=2)))


# ------------------------------------------------------------------------------------------------ flag sets


def recipe_of(*flags):
    _, _, training_args, recipe = run_glue.parse_args(["--task_name", "sst2", "--do_train", "--output_dir", "o",
                                                       *map(str, flags)])
    return recipe, training_args


@pytest.mark.parametrize("flags, expected", [
    # RandLoRA's train_all.sh lines and defaults: alpha 2r, its projection seed, its schedule and eps
    ([], dict(flag_set="RandLoRA run_glue.py", method="lora", rank=16, alpha=32, scaling="alpha/r",
              projection_seed=42, randlora_schedule=True, eps=1e-6)),
    (["--adapter_name", "lora", "--rank", 4, "--seed", 3], dict(method="lora", rank=4, alpha=8, projection_seed=3)),
    (["--adapter_name", "vera", "--rank", 256, "--seed", 2], dict(method="vera", rank=256, alpha=None,
                                                                   projection_seed=23)),
    (["--adapter_name", "randlora", "--rank", 100, "--seed", 5], dict(method="randlora", rank=100, alpha=200,
                                                                       scaling="alpha/r/sqrt(n)", projection_seed=466)),
    (["--adapter_name", "randlora", "--randlora_scaling", "peft"], dict(scaling="alpha/r", alpha=32)),
    (["--adapter_name", "none"], dict(method="none", rank=None, alpha=None, randlora_schedule=True)),
    # our flags override single settings of the recipe
    (["--adapter_alpha", 7, "--warmup_steps", 0.1, "--adam_epsilon", 1e-8], dict(alpha=7, randlora_schedule=False,
                                                                                 eps=1e-8)),
    # microsoft/LoRA: query/value (targets None = the architecture's query/value), alpha as given, Trainer defaults
    (["--apply_lora", "--lora_r", 8, "--lora_alpha", 16], dict(flag_set="microsoft/LoRA run_glue.py", method="lora",
                                                              rank=8, alpha=16, targets=None, randlora_schedule=False,
                                                              eps=1e-8)),
    (["--apply_lora", "--rank", 4], dict(rank=4, alpha=4)),
])
def test_each_flag_set_settles_its_source_tools_recipe(flags, expected):
    recipe, training_args = recipe_of(*flags)
    eps = expected.pop("eps", None)
    assert {k: getattr(recipe, k) for k in expected} == expected
    if eps is not None:
        assert training_args.adam_epsilon == eps
    assert recipe.dropout == 0.0


def test_randlora_targets_and_the_forks_scale_on_a_model(tiny_roberta):
    recipe, _ = recipe_of("--adapter_name", "randlora", "--rank", 8)
    heads = run_glue.head_modules(tiny_roberta)
    targets = run_glue.adapter_targets(tiny_roberta, recipe, heads)
    adapted = {n for n, m in tiny_roberta.named_modules() if isinstance(m, torch.nn.Linear) and n in targets}
    assert len(adapted) == 12 and "classifier.dense" not in adapted  # 2 layers x (q, k, v, 3 dense)
    assert {n.split(".")[-1] for n in adapted} == {"query", "key", "value", "dense"}
    # min(in, out) = 32 everywhere: n = 32 / 8 = 4 bases, scale 16 / 8 / sqrt(4) = 1, stored as alpha 8
    assert run_glue.effective_alpha(tiny_roberta, recipe, targets) == pytest.approx(8.0)
    microsoft, _ = recipe_of("--apply_lora", "--lora_r", 8, "--lora_alpha", 16)
    assert run_glue.adapter_targets(tiny_roberta, microsoft, heads) == ["query", "value"]


def test_old_trainer_flag_names_of_the_source_tools_are_accepted():
    _, training_args = recipe_of("--apply_lora", "--evaluation_strategy", "epoch", "--local-rank=0")
    assert training_args.eval_strategy == "epoch" and training_args.local_rank == 0


def test_new_head_starts_from_another_tasks_adapter_with_a_fresh_head(tmp_path):
    """The LoRA paper starts MRPC/RTE/STS-B from the MNLI adapter: every adapter tensor loads, no head tensor does."""
    from safetensors.torch import load_file
    from transformers import RobertaForSequenceClassification

    import peft_layers
    from run_glue import load_adapter_without_head

    def adapted(num_labels, seed):
        torch.manual_seed(seed)
        model = RobertaForSequenceClassification(tiny_roberta_config(num_labels=num_labels))
        return peft_layers.apply_adapter(model, "lora", 4, 8, ["query", "value"], modules_to_save=["classifier"])

    mnli = adapted(3, 0)
    for param in mnli.parameters():
        if param.requires_grad:
            param.data.normal_()  # a trained adapter and head
    peft_layers.save_adapter(mnli, tmp_path / "mnli")
    mrpc = adapted(2, 1)
    head_before = {n: p.detach().clone() for n, p in mrpc.named_parameters() if "classifier" in n}
    load_adapter_without_head(mrpc, tmp_path / "mnli", ["classifier"])
    saved = load_file(str(tmp_path / "mnli" / peft_layers.ADAPTER_FILE))
    adapter_keys = [k for k in saved if "lora_" in k]
    assert adapter_keys and all(torch.equal(dict(mrpc.named_parameters())[k], saved[k]) for k in adapter_keys)
    assert all(torch.equal(p, head_before[n]) for n, p in mrpc.named_parameters() if "classifier" in n)
    with pytest.raises(peft_layers.AdapterError, match="classifier"):  # without --new_head the head must fit
        peft_layers.load_adapter(adapted(2, 1), tmp_path / "mnli")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_checkpoint_that_names_its_labels_keeps_their_meaning(arch, tmp_path):
    """roberta-large-mnli names its labels CONTRADICTION 0, NEUTRAL 1, ENTAILMENT 2; GLUE's MNLI ids are entailment
    0, neutral 1, contradiction 2. Both source tools map the task's labels to the checkpoint's ids; here the
    classifier's outputs are put in the task's order, so each task label still gets the logit it had."""
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification, RobertaForSequenceClassification
    named = {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}
    config = {"bert": tiny_bert_config, "roberta": tiny_roberta_config}[arch](
        num_labels=3, label2id=named, id2label={i: n for n, i in named.items()})
    torch.manual_seed(0)
    original = {"bert": BertForSequenceClassification, "roberta": RobertaForSequenceClassification}[arch](config)
    path = save_tiny(tmp_path / "named", original.eval())
    model_args, data_args, training_args, _ = run_glue.parse_args(
        ["--model_name_or_path", path, "--task_name", "mnli", "--do_eval", "--output_dir", tmp_path / "out"])
    model, _ = run_glue.load_model(model_args, data_args, training_args)
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        before, after = original(input_ids=ids).logits, model.eval()(input_ids=ids).logits
    order = [named[label.upper()] for label in glue_data.TASKS["mnli"].labels]  # entailment -> its id 2, ...
    torch.testing.assert_close(after, before[:, order])
    assert model.config.id2label == dict(enumerate(glue_data.TASKS["mnli"].labels))


def test_microsoft_lora_flags_on_deberta_draw_lora_a_as_its_deberta_does(tmp_path):
    """microsoft/LoRA's DeBERTa-v2 _init_weights draws lora_A from N(0, initializer_range); loralib's Kaiming-uniform
    (its RoBERTa, std 1 / sqrt(3 in) = 0.10 here) stays for other models."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, RobertaForSequenceClassification
    torch.manual_seed(0)
    deberta = DebertaV2Config(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128, num_labels=2, initializer_range=0.02)
    models = {"deberta": DebertaV2ForSequenceClassification(deberta),
              "roberta": RobertaForSequenceClassification(tiny_roberta_config(num_labels=2))}
    stds = {}
    for name, model in models.items():
        model_args, data_args, training_args, recipe = run_glue.parse_args(
            ["--model_name_or_path", save_tiny(tmp_path / name, model), "--task_name", "rte", "--do_train",
             "--apply_lora", "--lora_r", "8", "--lora_alpha", "16", "--output_dir", tmp_path / name / "out"])
        adapted = run_glue.add_adapter(run_glue.load_model(model_args, data_args, training_args)[0], recipe, model_args)
        stds[name] = torch.cat([layer.lora_A.flatten() for _, layer in peft_layers.adapter_layers(adapted)]).std()
    assert 0.017 < stds["deberta"] < 0.023 and 0.08 < stds["roberta"] < 0.12, stds
