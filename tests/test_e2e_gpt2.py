"""gpt2_ft.py and gpt2_beam.py on a tiny GPT-2 (random weights, real 50257-token vocabulary) and real E2E rows:
training lowers the loss, --resume continues exactly, full fine-tuning counts every trained token, beam decoding
is deterministic, ordered, deduplicated and gives the same file on one and on two processes."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA_DIR, REPO, free_port, reset_accelerate
from safetensors.torch import load_file

import gpt2_beam
import gpt2_ft
import peft_layers
from common import UsageError
from e2e_data import group_references, load_e2e

DEVSET = DATA_DIR / "e2e" / "original" / "devset.csv"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer):
    """A saved tiny GPT-2 with its tokenizer, loadable by name like a real checkpoint folder."""
    from conftest import tiny_gpt2_config
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each script run builds its own Accelerator, as a new process would."""
    reset_accelerate()
    yield


def run_script(module, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, args)])
    module.main()


def train(monkeypatch, tiny_dir, work_dir, *extra):
    run_script(gpt2_ft, monkeypatch, "--train_data", DEVSET, "--valid_data", DEVSET, "--model_name_or_path", tiny_dir,
               "--max_train_examples", 64, "--max_valid_examples", 16, "--train_batch_size", 8, "--lr", 5e-2,
               "--warmup_step", 0, "--scheduler", "constant_with_warmup", "--max_epoch", 2, "--eval_interval", 1000,
               "--save_interval", 4, "--work_dir", work_dir, *extra)


class Killed(BaseException):
    pass


def train_killed_after_checkpoint(monkeypatch, tiny_dir, work_dir, step, *extra):
    """The same run, killed right after it wrote checkpoint-<step>."""
    checkpoint = gpt2_ft.Trainer.checkpoint

    def checkpoint_then_die(self, *a, **kw):
        checkpoint(self, *a, **kw)
        if self.state.step == step:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(gpt2_ft.Trainer, "checkpoint", checkpoint_then_die)
        with pytest.raises(Killed):
            train(monkeypatch, tiny_dir, work_dir, *extra)
    reset_accelerate()


def base_valid_loss(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    examples = gpt2_ft.encode(load_e2e(DEVSET), tokenizer, 512, limit=16)
    batch = gpt2_ft.make_collate(tokenizer.eos_token_id)(examples)
    with torch.no_grad():
        loss, _ = gpt2_ft.completion_loss(model, batch, 0.0)
    return loss.item()


def test_training_lowers_loss_and_resume_continues_exactly(tmp_path, monkeypatch, tiny_dir, gpt2_tokenizer):
    # Uninterrupted: 10 steps over 64 rows (8 batches an epoch, so it crosses an epoch boundary).
    train(monkeypatch, tiny_dir, tmp_path / "full", "--max_step", 10)
    results = json.loads((tmp_path / "full" / "train_results.json").read_text())
    assert results["step"] == 10
    assert results["valid_loss"] < base_valid_loss(tiny_dir, gpt2_tokenizer) - 0.05
    assert results["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers x (q, v) x (A + B), r = 4

    # Killed after its checkpoint at step 8, then resumed: same adapter as the uninterrupted run, to the last bit.
    train_killed_after_checkpoint(monkeypatch, tiny_dir, tmp_path / "split", 8, "--max_step", 10)
    train(monkeypatch, tiny_dir, tmp_path / "split", "--max_step", 10, "--resume")
    full = load_file(tmp_path / "full" / "final" / "adapter.safetensors")
    resumed = load_file(tmp_path / "split" / "final" / "adapter.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    assert json.loads((tmp_path / "split" / "train_results.json").read_text())["step"] == 10
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-4", "checkpoint-8"]

    # --resume with another command: its checkpoints are another experiment. Refused, naming what changed.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "split").iterdir()}
    with pytest.raises(UsageError, match=r"--resume: the checkpoints in .*split were trained with other settings "
                                         r"\(lr: 0\.05 then, 0\.01 now\); choose another --work_dir"):
        train(monkeypatch, tiny_dir, tmp_path / "split", "--max_step", 10, "--lr", 0.01, "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "split").iterdir()} == before  # nothing touched
    reset_accelerate()
    # A fresh run there (no --resume) removes what the earlier run left: resume checkpoints (--resume would take
    # them), model.<step>.pt, final/ and train_results.json (a fresh run stopped early would look finished).
    train_killed_after_checkpoint(monkeypatch, tiny_dir, tmp_path / "split", 4, "--max_step", 10, "--lr", 0.01)
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-4"]
    assert sorted(p.name for p in (tmp_path / "split").glob("model.*.pt")) == ["model.4.pt"]
    assert not (tmp_path / "split" / "final").exists() and not (tmp_path / "split" / "train_results.json").exists()


def test_grad_acc_counts_batches_as_microsoft_lora(tmp_path, monkeypatch, tiny_dir, capfd):
    """microsoft/LoRA's --grad_acc: a step is a batch (--max_step, the intervals, the names, the schedule), an update
    comes every --grad_acc batches counted over the whole run, across an epoch's end (8 batches an epoch here), and
    --resume at a window's end continues exactly; one that ends inside a window keeps the windows' places."""
    def saved_state(run, step):
        return torch.load(tmp_path / run / f"checkpoint-{step}" / gpt2_ft.STATE_FILE, weights_only=True)

    train(monkeypatch, tiny_dir, tmp_path / "full", "--grad_acc", 3, "--max_step", 12)
    state = saved_state("full", 12)
    assert state["step"] == 12 and state["scheduler"]["last_epoch"] == 12  # the schedule moves every batch
    assert {s["step"] for s in state["optimizer"]["state"].values()} == {4}  # updates at 3, 6, 9 (past 8) and 12
    assert sorted(p.name for p in (tmp_path / "full").glob("model.*.pt")) == ["model.12.pt", "model.4.pt",
                                                                              "model.8.pt"]
    train_killed_after_checkpoint(monkeypatch, tiny_dir, tmp_path / "split", 6, "--grad_acc", 3, "--max_step", 12,
                                  "--save_interval", 3)
    train(monkeypatch, tiny_dir, tmp_path / "split", "--grad_acc", 3, "--max_step", 12, "--save_interval", 3,
          "--resume")
    full = load_file(tmp_path / "full" / "final" / "adapter.safetensors")
    resumed = load_file(tmp_path / "split" / "final" / "adapter.safetensors")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    # Stopped at batch 8, inside the window 7-9: said, and the next update still comes at batch 9.
    train_killed_after_checkpoint(monkeypatch, tiny_dir, tmp_path / "mid", 8, "--grad_acc", 3, "--max_step", 12)
    capfd.readouterr()
    train(monkeypatch, tiny_dir, tmp_path / "mid", "--grad_acc", 3, "--max_step", 12, "--resume")
    assert {s["step"] for s in saved_state("mid", 12)["optimizer"]["state"].values()} == {4}
    assert "checkpoint-8 ends inside a --grad_acc 3 window" in capfd.readouterr().err


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_and_constant_schedules_are_microsoft_loras(warmup):
    """Its CosineAnnealingWarmupRestarts (optimizer.py): linear warm-up, then a cosine over the whole horizon counted
    from step 0, and lr 0 for the first update even without warm-up (its init_lr runs after the constructor's first
    step); its `constant` is constant after warm-up."""
    def lrs(scheduler_name):
        args, _ = gpt2_ft.parse_args(["--train_data", DEVSET, "--scheduler", scheduler_name, "--warmup_step", warmup,
                                      "--lr", 0.1])
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
        scheduler, seen = gpt2_ft.make_scheduler(args, optimizer, horizon=10), []
        for _ in range(12):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    def theirs(step):
        if step == 0 or step < warmup:
            return 0.1 * step / warmup if warmup else 0.0
        return 0.1 * 0.5 * (1 + math.cos(math.pi * min(step, 10) / 10))
    assert lrs("cosine") == pytest.approx([theirs(step) for step in range(12)], abs=1e-12)
    assert lrs("constant") == pytest.approx([0.1 * min(1, step / warmup) if warmup else 0.1 for step in range(12)])


def test_full_fine_tuning_reports_tokens_and_memory(tmp_path, monkeypatch, tiny_dir, gpt2_tokenizer):
    # One epoch over 64 rows: every non-padding token of every row is trained on exactly once.
    train(monkeypatch, tiny_dir, tmp_path, "--adapter_name", "none", "--max_epoch", 1, "--lr", 1e-3)
    results = json.loads((tmp_path / "train_results.json").read_text())
    examples = gpt2_ft.encode(load_e2e(DEVSET), gpt2_tokenizer, 512, limit=64)
    assert results["step"] == 8 and results["trainable_params"] == results["total_params"]
    assert results["train_tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert results["tokens_per_second"] == pytest.approx(results["train_tokens"] / results["train_seconds"], rel=1e-3)
    assert results["peak_memory_kind"] == "cpu_peak_rss" and results["peak_memory_gib"] > 0.1
    assert results["valid_loss"] < base_valid_loss(tiny_dir, gpt2_tokenizer)
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    """A LoRA adapter with non-zero B, so that merging it changes what the model generates."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_layers.apply_adapter(model, "lora", 4, 32)
    torch.manual_seed(1)
    for name, tensor in peft_layers.adapter_state_dict(model).items():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(tensor, std=0.5)
    return peft_layers.save_adapter(model, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def beam_data(tmp_path_factory):
    """Rows of 6 real meaning representations, interleaved so that several MRs repeat."""
    rows = load_e2e(DEVSET)
    contexts, refs = group_references(rows)
    picked = [{"context": c, "completion": r} for c in contexts[:6] for r in refs[c][:2]]
    picked = picked[::2] + picked[1::2]  # A B C D E F A B C D E F
    path = tmp_path_factory.mktemp("beam") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path, contexts[:6]


BEAM_FLAGS = ["--beam", 3, "--eval_len", 6, "--min_length", 4, "--no_repeat_ngram_size", 2]


def test_beam_output_is_deduplicated_ordered_and_deterministic(tmp_path, monkeypatch, tiny_dir, adapter_dir, beam_data,
                                                               capsys):
    data, contexts = beam_data
    common = ["--data", data, "--model_name_or_path", tiny_dir, "--init_checkpoint", adapter_dir, *BEAM_FLAGS]
    run_script(gpt2_beam, monkeypatch, *common, "--batch_size", 4, "--work_dir", tmp_path / "a")
    # the recipe's values for flags left out, where microsoft/LoRA's gpt2_beam.py has other defaults, are said
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: not given"))
    assert "--length_penalty 0.8 (theirs 1)" in note and "--output_file predict.jsonl (theirs beam_prediction.jsonl)"\
        in note and "--beam" not in note and "--eval_len" not in note
    run_script(gpt2_beam, monkeypatch, *common, "--batch_size", 1, "--work_dir", tmp_path / "b")
    run_script(gpt2_beam, monkeypatch, "--data", data, "--model_name_or_path", tiny_dir, *BEAM_FLAGS,
               "--batch_size", 4, "--work_dir", tmp_path / "base")
    out_a = (tmp_path / "a" / "predict.jsonl").read_text()
    assert out_a == (tmp_path / "b" / "predict.jsonl").read_text()  # batching and padding change nothing
    lines = [json.loads(line) for line in out_a.splitlines()]
    assert [line["id"] for line in lines] == list(range(6))
    assert [line["context"] for line in lines] == contexts  # each MR once, in order of first appearance
    assert all(4 <= len(line["token_ids"]) <= 6 and line["text"] for line in lines)
    base = [json.loads(line) for line in (tmp_path / "base" / "predict.jsonl").read_text().splitlines()]
    assert [b["token_ids"] for b in base] != [line["token_ids"] for line in lines]  # the adapter was merged in


def launch_two_processes(script, *args):
    """`accelerate launch --multi_gpu --num_processes 2 SCRIPT ARGS` on the CPU (gloo), from the repository."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", free_port(), REPO / script, *args]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_beam_gives_the_same_file(tmp_path, monkeypatch, tiny_dir, adapter_dir, beam_data):
    data, _ = beam_data
    common = ["--data", data, "--model_name_or_path", tiny_dir, "--init_checkpoint", adapter_dir, *BEAM_FLAGS,
              "--batch_size", 2]
    run_script(gpt2_beam, monkeypatch, *common, "--work_dir", tmp_path / "one")
    launch_two_processes("gpt2_beam.py", *common, "--work_dir", tmp_path / "two")
    assert (tmp_path / "two" / "predict.jsonl").read_text() == (tmp_path / "one" / "predict.jsonl").read_text()


def test_two_process_validation_counts_each_row_once(tmp_path, tiny_dir, gpt2_tokenizer):
    """10 validation rows in batches of 4 on 2 processes: accelerate repeats 2 rows to even out the batches, and
    the validation loss still averages every completion token of the 10 rows once (lr 0: the model as loaded)."""
    launch_two_processes("gpt2_ft.py", "--train_data", DEVSET, "--valid_data", DEVSET, "--model_name_or_path",
                         tiny_dir, "--max_train_examples", 16, "--max_valid_examples", 10, "--valid_batch_size", 4,
                         "--lr", 0, "--warmup_step", 0, "--max_step", 1, "--work_dir", tmp_path)
    valid_loss = json.loads((tmp_path / "train_results.json").read_text())["valid_loss"]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    rows = gpt2_ft.make_collate(gpt2_tokenizer.eos_token_id)(gpt2_ft.encode(load_e2e(DEVSET), gpt2_tokenizer, 512,
                                                                            limit=10))
    with torch.no_grad():
        expected = gpt2_ft.completion_loss(model, rows, 0.0)[0].item()
    assert valid_loss == pytest.approx(expected, rel=1e-5)


def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, tiny_dir, beam_data):
    data, _ = beam_data
    with pytest.raises(UsageError, match="--init_checkpoint .*missing does not exist"):
        run_script(gpt2_beam, monkeypatch, "--data", data, "--model_name_or_path", tiny_dir,
                   "--init_checkpoint", tmp_path / "missing", "--work_dir", tmp_path)
    with pytest.raises(UsageError, match="cannot load a tokenizer from"):
        run_script(gpt2_ft, monkeypatch, "--train_data", data, "--model_name_or_path", tmp_path / "no_model",
                   "--work_dir", tmp_path)
    with pytest.raises(UsageError, match="data file not found"):
        run_script(gpt2_ft, monkeypatch, "--train_data", tmp_path / "none.jsonl", "--model_name_or_path", tiny_dir,
                   "--work_dir", tmp_path)
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("method,extra,targets,scale", [
    ("vera", [], ["c_attn"], 1.0),
    # RandLoRA's NLG code: c_attn and the MLP, scale alpha / r / sqrt(n) with its n = n_ctx // r + 1 = 256 // 4 + 1
    ("randlora", ["--lora_alpha", 8], ["c_attn", "mlp.c_fc", "mlp.c_proj"], 8 / 4 / 65 ** 0.5),
    ("randlora", ["--lora_alpha", 8, "--randlora_scaling", "peft"], ["c_attn", "mlp.c_fc", "mlp.c_proj"], 2.0)])
def test_vera_and_randlora_defaults_follow_their_papers_e2e_code(method, extra, targets, scale):
    """`--adapter_name vera|randlora` adapt the layers those papers' E2E code adapts, at RandLoRA's own scale unless
    told otherwise, and say at start that all of c_attn is adapted where that code adapts its q and v slices."""
    from conftest import tiny_gpt2_config
    from transformers import GPT2LMHeadModel
    args, _ = gpt2_ft.parse_args(["--train_data", DEVSET, "--adapter_name", method, "--rank", 4, *extra])
    model = GPT2LMHeadModel(tiny_gpt2_config())
    setup = gpt2_ft.add_adapter(args, model, None, [])
    assert setup["targets"] == targets and setup["scaling"] == pytest.approx(scale)
    adapted = [name for name, _ in peft_layers.adapter_layers(model)]
    assert not any(name.endswith("attn.c_proj") for name in adapted)
    assert sum(name.endswith("mlp.c_fc") for name in adapted) == (method == "randlora") * model.config.n_layer
    assert any("all of c_attn" in note for note in setup["notes"])
    if extra == ["--lora_alpha", 8]:  # its bases per layer are not ours (PEFT's per-layer count): said at start
        assert any("every layer those 65 bases; here each layer has PEFT's ceil(min(in, out) / r) = 8" in note
                   for note in setup["notes"])
    if method == "vera":  # lambda_d (r) + lambda_b (3 x n_embd) per block: r1024 on GPT-2 medium, the paper's 0.098M
        assert setup["trainable_params"] == model.config.n_layer * (4 + 3 * model.config.n_embd)


def test_lora_on_another_causal_lm_takes_that_architectures_default_layers():
    """Without --target_modules, LoRA adapts the architecture's q/v projections (GPT-2: c_attn's q and v slices)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    args, _ = gpt2_ft.parse_args(["--train_data", DEVSET])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    setup = gpt2_ft.add_adapter(args, model, None, [])
    assert sorted(setup["targets"]) == ["q_proj", "v_proj"] and setup["notes"] == []
    # RandLoRA's own scale on a model that is not GPT-2 (its NLG code's n_ctx is GPT-2's): its PEFT fork's n
    args, _ = gpt2_ft.parse_args(["--train_data", DEVSET, "--adapter_name", "randlora", "--rank", 4,
                                  "--target_modules", "q_proj", "v_proj"])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert gpt2_ft.add_adapter(args, model, None, [])["scaling"] == pytest.approx(640 / 4 / 4 ** 0.5)  # n = 16 / 4
    args, _ = gpt2_ft.parse_args(["--train_data", DEVSET, "--adapter_name", "randlora", "--rank", 4])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(peft_layers.AdapterError, match=r"no linear layer matches target_modules \['c_attn'"):
        gpt2_ft.add_adapter(args, model, None, [])  # GPT-2's layer names, said as such


def test_the_base_model_trains_without_dropout_of_its_own_as_in_microsoft_lora(tiny_dir, gpt2_tokenizer):
    """microsoft/LoRA's GPT-2 has no dropout but the adapter's, while Hugging Face's configs say 0.1: by default the
    base model's own dropout is 0 (said at start), so a training-mode step is random only through the adapter;
    --model_dropout 0.1 keeps Hugging Face's."""
    batch = gpt2_ft.make_collate(gpt2_tokenizer.eos_token_id)(
        gpt2_ft.encode(load_e2e(DEVSET), gpt2_tokenizer, 512, limit=4))

    def two_training_losses(*extra):
        args, _ = gpt2_ft.parse_args(["--train_data", DEVSET, "--model_name_or_path", tiny_dir, "--lora_dropout", 0,
                                      *extra])
        model, _, notes = gpt2_ft.load_model(args)
        setup = gpt2_ft.add_adapter(args, model, {}, notes)
        model.train()
        with torch.no_grad():
            return [gpt2_ft.completion_loss(model, batch, 0.1)[0].item() for _ in range(2)], setup

    (first, second), setup = two_training_losses()
    assert first == second
    assert setup["model_dropout"] == 0 and any(
        "attn_pdrop 0.1, embd_pdrop 0.1, resid_pdrop 0.1" in note for note in setup["notes"]), setup["notes"]
    (first, second), setup = two_training_losses("--model_dropout", 0.1)
    assert first != second and not any("dropout" in note for note in setup["notes"])
