"""run_distributed_eval.py: sharding, gathering, metrics and failure handling, on a tiny random BART (CPU, offline).

The model uses the real BART BPE (GPT-2 vocab + 5 special tokens) from the shared data folder, built by the
benchmark's `save_random_bart`, and is evaluated on the WMT en-ro sample.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, free_port
from rouge_score import rouge_scorer, scoring
from sacrebleu.metrics import BLEU

import peft_layers
import run_distributed_eval as rde
from bench.bench_distributed_eval import save_random_bart
from common import run_main

REPO = Path(__file__).resolve().parents[1]
WMT_DIR = DATA_DIR / "seq2seq" / "wmt_en_ro"
XSUM_DIR = DATA_DIR / "seq2seq" / "xsum_sample"
MAX_LENGTH = 10  # generated tokens: small, as decoding steps dominate the test time
N_OBS = 10  # of the 16 WMT val pairs
# Keys that depend on how the run was launched and timed, not on what it computed (n_gpus: the legacy name of
# num_processes).
TIMING_KEYS = {"seconds_per_sample", "generation_seconds_per_sample", "num_processes", "n_gpus",
               "rank0_generation_seconds", "rank0_wait_seconds", "rank0_wait_cpu_seconds"}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a saved tiny BART, what it generates for each WMT source on its own, and a data folder scored against it


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    # init_std=0.5: a large random init makes the outputs depend on the input (so a wrong order shows) and keeps
    # the logits far apart (so batch padding or thread count cannot flip a greedy choice).
    return save_random_bart(tmp_path_factory.mktemp("tiny_bart"), d_model=16, layers=1, init_std=0.5)


def generate_one_by_one(model_dir, sources, adapter_dir=None, max_length=MAX_LENGTH, **generate_kwargs):
    """Reference generations: each source alone (no batching, no padding, no sharding)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    if adapter_dir:
        model = peft_layers.load_adapter(model, adapter_dir)
    model.eval()  # eval() merges an adapter
    if max_length is not None:  # None: the model's generation config decides, as in a run without --max_length
        generate_kwargs["max_length"] = max_length
    outputs = []
    with torch.inference_mode():
        for source in sources:
            inputs = tokenizer(source, truncation=True, max_length=1024, return_tensors="pt")
            ids = model.generate(**inputs, **generate_kwargs)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            outputs.append(texts if len(texts) > 1 else texts[0])
    return outputs


def read_lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


WMT_SOURCES = (WMT_DIR / "val.source").read_text(encoding="utf-8").splitlines()
WMT_TARGETS = (WMT_DIR / "val.target").read_text(encoding="utf-8").splitlines()
assert len(WMT_SOURCES) == len(WMT_TARGETS) == 16


@pytest.fixture(scope="module")
def expected(bart_dir):
    generations = generate_one_by_one(bart_dir, WMT_SOURCES[:N_OBS])
    assert len(set(generations)) == N_OBS  # all different: a wrong order cannot go unnoticed
    return generations


@pytest.fixture(scope="module")
def mixed_data_dir(tmp_path_factory, expected):
    """WMT sources with references that are half the model's own output, half the real Romanian: the scores are
    neither 0 nor 100, so comparing them with direct library calls means something."""
    path = tmp_path_factory.mktemp("mixed")
    shutil.copy(WMT_DIR / "val.source", path / "val.source")
    targets = [generated if i % 2 == 0 else real for i, (generated, real) in
               enumerate(zip(expected, WMT_TARGETS[:N_OBS], strict=True))]
    targets += WMT_TARGETS[N_OBS:]  # (not read: --n_obs)
    (path / "val.target").write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    return path


def run_in_process(monkeypatch, *argv):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["run_distributed_eval.py", *map(str, argv)])
    run_main(rde.main)


def subprocess_env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def seed_stale_run(save_dir, n_examples, world_size=2):
    """Rank files of an 'earlier run' covering every example; a new run must never read them."""
    for rank in range(world_size):
        stale = {"run_id": "20200101-000000-deadbeef", "rank": rank, "world_size": world_size,
                 "generation_seconds": 1.0,
                 "results": [{"id": i, "pred": "STALE"} for i in range(rank, n_examples, world_size)]}
        path = Path(save_dir) / ".tmp_20200101-000000-deadbeef" / f"rank_{rank}_output.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stale))


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def test_split_sentences_without_downloaded_data():
    split = rde.split_sentences
    assert split("Hello world. This is it.") == ["Hello world.", "This is it."]
    assert split("Mr. Smith met Dr. Jones in the U.S. Army. J. R. R. Tolkien wrote it.") == [
        "Mr. Smith met Dr. Jones in the U.S. Army.", "J. R. R. Tolkien wrote it."]
    assert split('"Stop!" she said. Really? Yes (mostly). 2013 was a good year.') == [
        '"Stop!" she said.', "Really?", "Yes (mostly).", "2013 was a good year."]
    assert split("It costs 3.5 dollars, e.g. at noon. Ștefan a venit. „Bine”, a spus.") == [
        "It costs 3.5 dollars, e.g. at noon.", "Ștefan a venit.", "„Bine”, a spus."]
    assert split("no final period here") == ["no final period here"]
    assert split("   ") == []


def test_generate_kwargs_are_typed_and_checked():
    assert rde.parse_generate_kwargs(["--num_beams=4", "--length_penalty", "0.6", "--early_stopping=True",
                                      "--no-repeat-ngram-size=3"]) == {
        "num_beams": 4, "length_penalty": 0.6, "early_stopping": True, "no_repeat_ngram_size": 3}
    for bad, message in ((["--num_beams=four"], "int, a float, true or false"),
                         (["--num_beam=4"], "unknown flag --num_beam"),
                         (["--num_beams"], "needs a value"),
                         (["stray"], "unexpected argument")):
        with pytest.raises(rde.UsageError, match=message):
            rde.parse_generate_kwargs(bad)


def test_shards_cover_every_example_once_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 2, 8, 6, 4, 0]
    for world_size in (1, 2, 3, 4):
        shards = [rde.shard_by_length(lengths, rank, world_size) for rank in range(world_size)]
        assert sorted(i for shard in shards for i in shard) == list(range(len(lengths)))
        for shard in shards:
            assert [lengths[i] for i in shard] == sorted((lengths[i] for i in shard), reverse=True)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_bleu_and_rouge_equal_direct_library_calls():
    references = WMT_TARGETS
    # Deterministic, partly right predictions: drop every third word, keep the rest.
    predictions = [" ".join(w for j, w in enumerate(r.split()) if j % 3 != 1) for r in references]
    bleu = rde.compute_bleu(predictions, references)
    assert bleu["bleu"] == round(BLEU().corpus_score(predictions, [references]).score, 4)
    assert 0 < bleu["bleu"] < 100

    rouge = rde.compute_rouge(predictions, references)
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct_lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references, strict=True):
        scores = direct.score(reference, prediction)
        scores.update(direct_lsum.score("\n".join(rde.split_sentences(reference)),
                                        "\n".join(rde.split_sentences(prediction))))
        aggregator.add_scores(scores)
    np.random.seed(0)
    assert rouge == {k: round(v.mid.fmeasure * 100, 4) for k, v in aggregator.aggregate().items()}
    assert all(0 < v < 100 for v in rouge.values())
    assert rouge["rougeLsum"] != rouge["rougeL"]  # the references have several sentences: splitting matters


# ---------------------------------------------------------------------------------------------------------------
# End to end


TRANSLATION_FLAGS = ["--type_path", "val", "--task", "translation_en_to_ro", "--n_obs", N_OBS, "--bs", 3,
                     f"--max_length={MAX_LENGTH}"]


@pytest.fixture(scope="module")
def one_process_dir(tmp_path_factory, bart_dir, mixed_data_dir):
    """Plain `python run_distributed_eval.py` (run in this process), with a stale run folder beside it."""
    save_dir = tmp_path_factory.mktemp("one_process")
    seed_stale_run(save_dir, N_OBS, world_size=1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(monkeypatch, "--model_name", bart_dir, "--data_dir", mixed_data_dir, "--save_dir", save_dir,
                       *TRANSLATION_FLAGS)
    return save_dir


def test_one_process_restores_order_and_scores(one_process_dir, expected, mixed_data_dir):
    generations = read_lines(one_process_dir / "val_generations.txt")
    assert generations == expected  # batched, sorted by length, put back in order; nothing stale
    targets = read_lines(mixed_data_dir / "val.target")[:N_OBS]
    metrics = json.loads((one_process_dir / "val_bleu.json").read_text())
    assert metrics["bleu"] == round(BLEU().corpus_score(generations, [targets]).score, 4)
    assert 0 < metrics["bleu"] < 100
    assert metrics["n_obs"] == N_OBS and metrics["num_processes"] == 1
    assert metrics["seconds_per_sample"] >= metrics["generation_seconds_per_sample"] > 0
    # Our run folder is gone; the stale one is left alone.
    assert [p.name for p in one_process_dir.glob(".tmp_*")] == [".tmp_20200101-000000-deadbeef"]


def test_summarization_scores_rouge(monkeypatch, capsys, caplog, tmp_path, bart_dir, expected, mixed_data_dir):
    caplog.set_level("INFO", logger="run_distributed_eval")
    run_in_process(monkeypatch, "--model_name", bart_dir, "--data_dir", mixed_data_dir, "--save_dir", tmp_path,
                   "--type_path", "val", "--task", "summarization", "--n_obs", N_OBS, "--bs", 4, "--local-rank=0",
                   f"--max_length={MAX_LENGTH}")
    assert read_lines(tmp_path / "val_generations.txt") == expected
    rouge = json.loads((tmp_path / "val_rouge.json").read_text())
    targets = read_lines(mixed_data_dir / "val.target")[:N_OBS]
    assert {k: rouge[k] for k in rde.ROUGE_KEYS} == rde.compute_rouge(expected, targets)
    assert 0 < rouge["rouge2"] < 100
    out = capsys.readouterr().out
    assert ast.literal_eval(out.strip().splitlines()[-1]) == rouge  # the metrics on stdout, as the legacy script
    assert "note: rougeLsum splits sentences with a rule-based splitter" in caplog.text  # said at start


def test_two_processes_equal_one_process(tmp_path, bart_dir, expected, mixed_data_dir, one_process_dir):
    seed_stale_run(tmp_path, N_OBS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "run_distributed_eval.py", "--model_name", str(bart_dir), "--data_dir", str(mixed_data_dir),
         "--save_dir", str(tmp_path), *map(str, TRANSLATION_FLAGS)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignoring 1 folder(s) left by earlier runs" in result.stderr
    assert read_lines(tmp_path / "val_generations.txt") == expected
    one = json.loads((one_process_dir / "val_bleu.json").read_text())
    two = json.loads((tmp_path / "val_bleu.json").read_text())
    assert two["num_processes"] == 2
    assert {k: v for k, v in two.items() if k not in TIMING_KEYS} == {
        k: v for k, v in one.items() if k not in TIMING_KEYS}


def test_json_lines_and_pseudolabels(monkeypatch, tmp_path, bart_dir):
    # {"translation": {"en", "ro"}} lines, languages taken from the task name; two candidates per example.
    run_in_process(monkeypatch, "--model_name", bart_dir, "--data_dir", WMT_DIR, "--save_dir", tmp_path,
                   "--type_path", "val", "--task", "translation_en_to_ro", "--n_obs", 4, "--bs", 3,
                   "--num_return_sequences", 2, f"--max_length={MAX_LENGTH}")
    pseudolabels = json.loads((tmp_path / "pseudolabel_results.json").read_text())
    assert pseudolabels == generate_one_by_one(bart_dir, WMT_SOURCES[:4], num_beams=2, num_return_sequences=2)
    assert not list(tmp_path.glob("val_*"))  # candidates are pseudolabels, not scored

    # {"document", "summary"} lines (XSum), ROUGE.
    run_in_process(monkeypatch, "--model_name", bart_dir, "--data_dir", XSUM_DIR, "--save_dir", tmp_path,
                   "--type_path", "sample", "--n_obs", 4, "--bs", 3, f"--max_length={MAX_LENGTH}")
    records = [json.loads(line) for line in (XSUM_DIR / "sample.json").read_text().splitlines()[:4]]
    generations = read_lines(tmp_path / "sample_generations.txt")
    rouge = json.loads((tmp_path / "sample_rouge.json").read_text())
    assert generations == generate_one_by_one(bart_dir, [r["document"] for r in records])
    assert {k: rouge[k] for k in rde.ROUGE_KEYS} == rde.compute_rouge(generations, [r["summary"] for r in records])
    assert rouge["n_obs"] == 4


def test_adapter_is_loaded_and_merged(monkeypatch, tmp_path, bart_dir, expected, mixed_data_dir):
    from transformers import AutoModelForSeq2SeqLM
    model = peft_layers.apply_adapter(AutoModelForSeq2SeqLM.from_pretrained(bart_dir), "lora", rank=4)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (LoRA starts as a no-op): big enough to change the output
        for tensor in peft_layers.adapter_state_dict(model).values():
            tensor.copy_(torch.randn_like(tensor))
    peft_layers.save_adapter(model, tmp_path / "adapter")
    run_in_process(monkeypatch, "--model_name", bart_dir, "--adapter_path", tmp_path / "adapter", "--data_dir",
                   mixed_data_dir, "--save_dir", tmp_path / "out", "--type_path", "val", "--task", "translation",
                   "--n_obs", 4, "--bs", 3, f"--max_length={MAX_LENGTH}")
    generations = read_lines(tmp_path / "out" / "val_generations.txt")
    assert generations == generate_one_by_one(bart_dir, WMT_SOURCES[:4], adapter_dir=tmp_path / "adapter")
    assert generations != expected[:4]  # the adapter was really used


# Plays rank 1: joins the process group and the run-id broadcast like the real script, then dies without writing.
DYING_RANK = textwrap.dedent("""
    import os, torch.distributed as dist
    dist.init_process_group("gloo")
    dist.broadcast_object_list([None], src=0)
    os._exit(1)
""")


def test_dead_rank_fails_within_timeout_naming_it(tmp_path, bart_dir, expected, mixed_data_dir):
    seed_stale_run(tmp_path, N_OBS)  # a complete earlier run: must not fill the gap
    launch = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    # The dying peer starts first, so rank 0 (with its 4 s timeout also on start-up) never waits for it to import.
    rank1 = subprocess.Popen([sys.executable, "-c", DYING_RANK], env=subprocess_env(RANK="1", LOCAL_RANK="1", **launch))
    started = time.monotonic()
    rank0 = subprocess.Popen(
        [sys.executable, "run_distributed_eval.py", "--model_name", str(bart_dir), "--data_dir",
         str(mixed_data_dir), "--save_dir", str(tmp_path), "--type_path", "val", "--task", "translation",
         "--n_obs", str(N_OBS), "--bs", "3", "--sync_timeout", "4", f"--max_length={MAX_LENGTH}"],
        cwd=REPO, env=subprocess_env(RANK="0", LOCAL_RANK="0", **launch), stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = rank0.communicate(timeout=180)
        assert rank1.wait(timeout=30) == 1
    finally:
        rank0.kill(), rank1.kill()
    assert rank0.returncode == 1
    assert time.monotonic() - started < 120  # start-up + 10 tiny generations + the 4 s wait; never a hang
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: rank(s) 1 of 2 wrote nothing") and "--sync_timeout=4s" in error, stderr[-2000:]
    partial = json.loads((tmp_path / "val_partial_generations.json").read_text())
    assert partial["missing_ranks"] == [1] and partial["n_expected"] == N_OBS
    from transformers import AutoTokenizer
    lengths = [len(x) for x in AutoTokenizer.from_pretrained(bart_dir)(WMT_SOURCES[:N_OBS])["input_ids"]]
    rank0_ids = sorted(rde.shard_by_length(lengths, 0, 2))
    assert partial["generations"] == {str(i): expected[i] for i in rank0_ids}  # rank 0's own, none stale
    assert not (tmp_path / "val_bleu.json").exists() and not (tmp_path / "val_generations.txt").exists()


@pytest.mark.parametrize("change, message", [
    (["--type_path", "dev"], "no dev.source or dev.json in .*; --type_path should be one of: test, train, val"),
    (["--data_dir", "/nonexistent"], "--data_dir /nonexistent is not a folder"),
    (["--num_beam=2"], "unknown flag --num_beam"),
    (["--adapter_path", "/nonexistent"], "--adapter_path /nonexistent does not exist"),
])
def test_bad_input_is_one_clear_line(monkeypatch, capsys, tmp_path, change, message):
    with pytest.raises(SystemExit) as exit_info:  # the later flag wins, as in argparse
        run_in_process(monkeypatch, "--model_name", "unused", "--data_dir", WMT_DIR, "--type_path", "val",
                       "--task", "translation", "--save_dir", tmp_path / "out", *change)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_or_misaligned_files(monkeypatch, capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "val.source").write_text("a\nb\n")
    cases = [(None, "val.target is missing"), ("x\n", "has 2 lines but .* has 1"),
             (None, "translation pairs .*pass --src_lang and --tgt_lang")]
    for i, (target, message) in enumerate(cases):
        if i == 2:
            (data / "val.source").unlink()
            (data / "val.json").write_text(json.dumps({"translation": {"en": "a", "ro": "b"}}) + "\n")
        elif target is not None:
            (data / "val.target").write_text(target)
        with pytest.raises(SystemExit):
            run_in_process(monkeypatch, "--model_name", "unused", "--data_dir", data, "--save_dir", tmp_path / "o",
                           "--type_path", "val", "--task", "translation")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err


# ---------------------------------------------------------------------------------------------------------------
# The legacy Hugging Face command (issue 10), as written; only the paths are local


def test_legacy_torch_distributed_launch_command_runs_as_written(tmp_path, bart_dir):
    """torch 2.13 still ships the deprecated `torch.distributed.launch`; it passes `--local-rank=N` to the script
    and exports RANK/WORLD_SIZE. --fp16 on a machine without a GPU: one warning line, float32, recorded."""
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "run_distributed_eval.py",
               "--model_name", str(bart_dir), "--data_dir", str(WMT_DIR), "--save_dir", str(tmp_path / "out"),
               "--type_path", "val", "--task", "translation", "--bs", "8", "--fp16", "--num_beams", "5",
               "--length_penalty", "1.0"]  # the legacy parser's form (it pairs tokens; ours also takes --k=v)
    # The launcher's own --master_port default (29500) may be taken: its PET_ variable moves it, the line stays.
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(PET_MASTER_PORT=free_port()),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = json.loads((tmp_path / "out" / "val_bleu.json").read_text())
    assert metrics["n_gpus"] == metrics["num_processes"] == 2  # the legacy key, for old result readers
    assert {"bleu", "n_obs", "seconds_per_sample", "n_gpus"} <= metrics.keys()
    generations = read_lines(tmp_path / "out" / "val_generations.txt")
    assert generations == generate_one_by_one(bart_dir, WMT_SOURCES, max_length=None, num_beams=5,
                                              length_penalty=1.0)
    assert metrics["n_obs"] == 16
    assert metrics["bleu"] == round(BLEU().corpus_score(generations, [WMT_TARGETS]).score, 4)
    if not torch.cuda.is_available():
        warnings = [line for line in result.stderr.splitlines() if "--fp16 needs a CUDA GPU" in line]
        assert len(warnings) == 1 and "float32" in warnings[0], result.stderr[-3000:]  # rank 0 only
        assert metrics["dtype"] == "float32"


@pytest.mark.parametrize("spelling", [["--local_rank=1"], ["--local-rank=1"], ["--local_rank", "1"],
                                      ["--local-rank", "1"]])
def test_both_local_rank_spellings_are_accepted(spelling):
    """Old torch.distributed.launch passed --local_rank=N, torch >= 2.0 passes --local-rank=N."""
    args, generate_kwargs = rde.parse_args(["--model_name", "m", "--data_dir", "d", *spelling])
    assert args.local_rank == 1 and generate_kwargs == {}


def test_settings_and_sources_as_the_legacy_script_reads_them(bart_dir, tmp_path):
    """Where neither the task's settings nor the flags say: the model config's own prefix (BART hub configs carry
    " ", which changes the first BPE token) and its own num_beams (raised only when --num_return_sequences asks
    for more); a source line keeps its trailing blanks (a BPE token), a target is stripped."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(bart_dir), AutoTokenizer.from_pretrained(bart_dir)
    model.config.prefix, model.generation_config.num_beams = " ", 4
    common = ["--model_name", str(bart_dir), "--data_dir", str(tmp_path), "--save_dir", str(tmp_path / "out"),
              "--task", "translation"]
    args, kwargs = rde.parse_args([*common, "--num_return_sequences", "2"])
    settings = rde.generation_settings(args, model, tokenizer, kwargs)
    assert settings.prefix == " " and settings.kwargs["num_beams"] == 4
    args, kwargs = rde.parse_args([*common, "--prefix", "translate: "])
    assert rde.generation_settings(args, model, tokenizer, kwargs).prefix == "translate: "
    args, kwargs = rde.parse_args([*common, "--prefix", ""])  # an empty prefix is no prefix, not the model's " "
    assert rde.generation_settings(args, model, tokenizer, kwargs).prefix == ""
    # Several candidates while sampling: at least that many beams too (the legacy script's beam sampling).
    args, kwargs = rde.parse_args([*common, "--num_return_sequences", "6", "--do_sample=true"])
    assert rde.generation_settings(args, model, tokenizer, kwargs).kwargs["num_beams"] == 6
    (tmp_path / "test.source").write_text("Hello. \nWorld\t\n")
    (tmp_path / "test.target").write_text("Salut. \nLume\t\n")
    sources, targets = rde.read_examples([tmp_path / "test.source", tmp_path / "test.target"])
    assert sources == ["Hello. ", "World\t"] and targets == ["Salut.", "Lume"]
    # Text-mode reading, as the legacy script's linecache: Windows and old-Mac line ends, a byte-order mark.
    (tmp_path / "test.source").write_bytes("\ufeffHello. \r\nWorld\t\rAgain\r\n".encode())
    (tmp_path / "test.target").write_bytes(b"Salut.\r\nLume\r\nIar\r\n\r\n")  # one blank line too many: ignored
    sources, targets = rde.read_examples([tmp_path / "test.source", tmp_path / "test.target"])
    assert sources == ["Hello. ", "World\t", "Again"] and targets == ["Salut.", "Lume", "Iar"]


def test_metric_and_tokenizer_languages_as_the_legacy_script(monkeypatch, bart_dir, tmp_path):
    """BLEU for any task name containing 'translation', ROUGE for every other; a multilingual tokenizer's
    languages come only from --src_lang/--tgt_lang (mBART's code for English is en_XX, not the task name's en)."""
    for task, metric in [("translation", "bleu"), ("translation_en_to_ro", "bleu"), ("wmt_translation", "bleu"),
                         ("summarization", "rouge"), ("xsum", "rouge")]:
        args, _ = rde.parse_args(["--model_name", "m", "--data_dir", str(tmp_path), "--task", task])
        assert rde.plan_job(args).metric == metric, task
    from types import SimpleNamespace
    monkeypatch.setattr(rde.AutoTokenizer, "from_pretrained",
                        lambda name: SimpleNamespace(src_lang="en_XX", tgt_lang="ro_RO"))
    for flags, languages in [([], ("en_XX", "ro_RO")), (["--src_lang", "de_DE", "--tgt_lang", "fr_XX"],
                                                        ("de_DE", "fr_XX"))]:
        args, _ = rde.parse_args(["--model_name", str(bart_dir), "--data_dir", str(tmp_path),
                                  "--task", "translation_en_to_ro", *flags])
        _, tokenizer = rde.load_model(args, rde.plan_job(args))
        assert (tokenizer.src_lang, tokenizer.tgt_lang) == languages
