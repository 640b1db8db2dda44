"""microsoft/LoRA's NLG pipeline, run as its README writes it (only model and data paths changed), on a tiny
random GPT-2 with the real vocabulary and real E2E rows: gpt2_ft.py -> gpt2_beam.py -> gpt2_decode.py ->
measure_scores.py's command line on e2e_eval.py. The tests check what the commands mean: the adapter set-up of
the flag set, loralib's checkpoint layout, end tokens appended to 50256, one beam line per input line, the
scorer's files, the -p BLEU/NIST of the Python MTEval port; and that files flow both ways."""
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA_DIR, GPT2_VOCAB_DIR, REPO, free_port

import e2e_eval
import gpt2_beam
import gpt2_checkpoint
import gpt2_decode
import peft_layers
from common import UsageError

LORA_E2E = DATA_DIR / "e2e" / "lora_format"
EOT = 50256


def tiny_config(**kw):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=1024, **kw)


def format_converting(txt, n, start=0):
    """microsoft/LoRA's format_converting_e2e.py on the first lines of its own text file."""
    rows = []
    for line in txt.read_text(encoding="utf-8").splitlines()[start:start + n]:
        items = line.strip().split("||")
        rows.append({"context": items[0], "completion": items[1].strip("\n")})
    return rows


def gpt2_encode(rows, tokenizer):
    """microsoft/LoRA's gpt2_encode.py --add_bos --add_eos."""
    return [{"context": tokenizer.encode(r["context"]) + [EOT],
             "completion": tokenizer.encode(" " + r["completion"]) + [EOT]} for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_layout(tmp_path_factory, gpt2_tokenizer):
    """microsoft/LoRA's folders: data/e2e/{train,valid,test}.jsonl (token ids) and test_formatted.jsonl,
    vocab/ (OpenAI's encoder.json + vocab.bpe only), pretrained_checkpoints/ with an original-layout
    pytorch_model.bin (GPT2Model keys, causal-mask buffers included) and, beside it, the tiny model's config.json."""
    from transformers import GPT2LMHeadModel
    root = tmp_path_factory.mktemp("lora_nlg")
    data = root / "data" / "e2e"
    data.mkdir(parents=True)
    test_rows = format_converting(LORA_E2E / "test.txt", 12)  # 12 lines, 4 meaning representations
    write_jsonl(data / "test_formatted.jsonl", test_rows)
    write_jsonl(data / "test_200.jsonl", gpt2_encode(test_rows, gpt2_tokenizer))
    write_jsonl(data / "train.jsonl", gpt2_encode(format_converting(LORA_E2E / "valid.txt", 16), gpt2_tokenizer))
    write_jsonl(data / "valid.jsonl", gpt2_encode(format_converting(LORA_E2E / "valid.txt", 8, 100), gpt2_tokenizer))
    vocab = root / "vocab"
    vocab.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(GPT2_VOCAB_DIR / name, vocab / name)
    ckpt = root / "pretrained_checkpoints"
    ckpt.mkdir()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    sd = {k[len("transformer."):]: v for k, v in model.state_dict().items() if k.startswith("transformer.")}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 1024, 1024))
    torch.save(sd, ckpt / "gpt2-medium-pytorch_model.bin")
    model.config.to_json_file(ckpt / "config.json")
    return root


def launch(root, script, *args, env=None):
    """`python -m torch.distributed.launch --nproc_per_node=1 SCRIPT ...` (or plain python) from the layout root."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PET_MASTER_PORT=free_port(), **(env or {}))
    cmd = [sys.executable, *(["-m", "torch.distributed.launch", "--nproc_per_node=1"] if script != "plain" else []),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lora_nlg_commands_run_as_written_and_mean_the_same(lora_layout):
    root = lora_layout
    ft = launch(root, "ft",
                REPO / "gpt2_ft.py", "--train_data", "./data/e2e/train.jsonl",
                "--valid_data", "./data/e2e/valid.jsonl",
                "--train_batch_size", "8", "--grad_acc", "1", "--valid_batch_size", "4", "--seq_len", "512",
                "--model_card", "gpt2.md",
                "--init_checkpoint", "./pretrained_checkpoints/gpt2-medium-pytorch_model.bin",
                "--platform", "local", "--clip", "0.0", "--lr", "0.0002", "--weight_decay", "0.01", "--correct_bias",
                "--adam_beta2", "0.999", "--scheduler", "linear", "--warmup_step", "500", "--max_epoch", "5",
                "--save_interval", "1000", "--lora_dim", "4", "--lora_alpha", "32", "--lora_dropout", "0.1",
                "--label_smooth", "0.1", "--work_dir", "./trained_models/GPT2_M/e2e", "--random_seed", "110")
    work = root / "trained_models" / "GPT2_M" / "e2e"
    # The start line states the flag set's adapter set-up, and the results keep it.
    setup_line = next(line for line in ft.stdout.splitlines() if line.startswith("setup: "))
    for part in ("lora r=4 alpha=32 scaling=8", "targets=c_attn (q,v slices)", "dropout=0.1", "warm-up=500 steps",
                 "lr=0.0002", "betas (0.9, 0.999)", "bias correction on", "label_smooth=0.1", "seed=110",
                 "model_dropout=0"):  # microsoft/LoRA's GPT-2 has no dropout of its own
        assert part in setup_line, (part, setup_line)
    results = json.loads((work / "train_results.json").read_text())
    assert results["step"] == 10 and results["setup"]["alpha"] == 32 and results["setup"]["scaling"] == 8
    assert results["setup"]["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4)

    # model.<step>.pt at the end of each epoch (2 steps each), in loralib's layout, the whole model.
    assert sorted(p.name for p in work.glob("model.*.pt")) == [f"model.{s}.pt" for s in (10, 2, 4, 6, 8)]
    sd = torch.load(work / "model.10.pt", map_location="cpu", weights_only=True)["model_state_dict"]
    assert sd["module.transformer.h.0.attn.c_attn.lora_A"].shape == (2 * 4, 32)  # loralib MergedLinear, q and v
    assert sd["module.transformer.h.0.attn.c_attn.lora_B"].shape == (2 * 32, 4)
    assert torch.equal(sd["module.lm_head.decoder.weight"], sd["module.transformer.wte.weight"])
    # What microsoft/LoRA's GPT2LMModel.load_weight does with it: strip `module.transformer.`.
    names = {k[len("module.transformer."):] for k in sd if k.startswith("module.transformer.")}
    assert "h.1.mlp.c_fc.weight" in names and "h.1.attn.c_attn.lora_B" in names
    # The frozen weights are the original checkpoint's, untouched by training.
    original = torch.load(root / "pretrained_checkpoints" / "gpt2-medium-pytorch_model.bin", weights_only=True)
    assert torch.equal(sd["module.transformer.h.1.attn.c_attn.weight"], original["h.1.attn.c_attn.weight"])

    beam = launch(root, "beam",
                  REPO / "gpt2_beam.py", "--data", "./data/e2e/test_200.jsonl", "--batch_size", "8", "--seq_len", "512",
                  "--eval_len", "64", "--model_card", "gpt2.md", "--init_checkpoint",
                  "./trained_models/GPT2_M/e2e/model.10.pt", "--platform", "local", "--lora_dim", "4",
                  "--lora_alpha", "32", "--beam", "10", "--length_penalty", "0.8", "--no_repeat_ngram_size", "4",
                  "--repetition_penalty", "1.0", "--eos_token_id", "628", "--work_dir", "./trained_models/GPT2_M/e2e",
                  "--output_file", "predict.10.s200.jsonl")
    setup = json.loads(next(line for line in beam.stdout.splitlines() if line.startswith("setup: "))[7:])
    assert setup["end_tokens"] == [EOT, 628]  # --eos_token_id appends to [50256]
    assert setup["adapter"]["alpha"] == 32 and setup["adapter"]["rank"] == 4
    lines = [json.loads(line) for line in (work / "predict.10.s200.jsonl").read_text().splitlines()]
    test_rows = [json.loads(line) for line in (root / "data" / "e2e" / "test_200.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(len(test_rows)))  # one line per input line
    assert all(set(line) == {"id", "predict"} for line in lines)
    for line in lines:
        ends = [i for i, t in enumerate(line["predict"]) if t in (EOT, 628)]
        assert ends in ([], [len(line["predict"]) - 1]) and len(line["predict"]) <= 64
    by_context = {}
    for row, line in zip(test_rows, lines, strict=True):  # each meaning representation decoded once
        assert by_context.setdefault(tuple(row["context"]), line["predict"]) == line["predict"]
    assert len(by_context) < len(test_rows)  # the 12 lines repeat meaning representations

    launch(root, "plain", REPO / "gpt2_decode.py", "--vocab", "./vocab", "--sample_file",
           "./trained_models/GPT2_M/e2e/predict.10.s200.jsonl", "--input_file", "./data/e2e/test_formatted.jsonl",
           "--output_ref_file", "./trained_models/GPT2_M/e2e/e2e_ref.txt", "--output_pred_file",
           "./trained_models/GPT2_M/e2e/e2e_pred.txt")
    formatted = [json.loads(line) for line in (root / "data" / "e2e" / "test_formatted.jsonl").read_text().splitlines()]
    refs = {}
    for row in formatted:
        refs.setdefault(row["context"], []).append(" ".join(row["completion"].split()))
    assert e2e_eval.read_references(work / "e2e_ref.txt") == list(refs.values())
    from e2e_data import load_tokenizer
    tokenizer = load_tokenizer(GPT2_VOCAB_DIR)
    first = {}
    for row, line in zip(formatted, lines, strict=True):
        first.setdefault(row["context"], line["predict"])
    expected = [gpt2_decode.clean_prediction(tokenizer.decode(p)) for p in first.values()]
    assert e2e_eval.read_predictions(work / "e2e_pred.txt") == expected

    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    score = launch(root, "plain", REPO / "e2e_eval.py", "./trained_models/GPT2_M/e2e/e2e_ref.txt",
                   "./trained_models/GPT2_M/e2e/e2e_pred.txt", "-p")
    printed = dict(line.split(": ") for line in score.stdout.splitlines() if line.split(":")[0] in e2e_eval.METRICS)
    bleu, nist = e2e_eval.port_bleu_nist(list(refs.values()), expected)
    assert float(printed["BLEU"]) == pytest.approx(bleu, abs=1e-4)
    assert float(printed["NIST"]) == pytest.approx(nist, abs=1e-4)


def test_eos_token_id_appends_to_end_of_text(tmp_path, monkeypatch):
    """A model that always prefers one token: --eos_token_id 628 stops at 628 and still at 50256."""
    from transformers import GPT2LMHeadModel
    rows = gpt2_encode(format_converting(LORA_E2E / "test.txt", 2), _tokenizer())
    data = write_jsonl(tmp_path / "test.jsonl", rows)

    def eager_model(token):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(tiny_config())
        with torch.no_grad():  # every hidden state becomes ln_f.bias; its logit for `token` dominates
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(torch.randn(32))
            model.transformer.wte.weight[token] = 50 * model.transformer.ln_f.bias
        folder = tmp_path / f"eager{token}"
        model.save_pretrained(folder)
        return folder

    def predicts(model_dir, *eos):
        work = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        argv = ["--data", data, "--model_name_or_path", model_dir, "--beam", 2, "--eval_len", 6,
                "--no_repeat_ngram_size", 0, "--work_dir", work, *eos]
        _reset_accelerate()
        gpt2_beam.main(argv)
        return [json.loads(line)["predict"] for line in (work / "predict.jsonl").read_text().splitlines()]

    eager628, eager_eot = eager_model(628), eager_model(EOT)
    assert predicts(eager628, "--eos_token_id", 628) == [[628], [628]]
    assert predicts(eager628) == [[628] * 6] * 2                       # default [50256]: 628 does not end
    assert predicts(eager_eot, "--eos_token_id", 628) == [[EOT], [EOT]]  # 50256 still ends
    assert predicts(eager628, "--eos_token_id", 13, "--eos_token_id", 628) == [[628], [628]]  # repeated flag


def _tokenizer():
    from e2e_data import load_tokenizer
    return load_tokenizer(GPT2_VOCAB_DIR)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loralib_merged_delta(lora_A, lora_B, r, alpha, in_f, out_f):
    """loralib.MergedLinear(enable_lora=[True, False, True], fan_in_fan_out=True)'s weight update, computed its
    way: a grouped 1x1 convolution of lora_B over lora_A, zero-padded into the q and v slices."""
    delta = F.conv1d(lora_A.unsqueeze(0), lora_B.unsqueeze(-1), groups=2).squeeze(0)  # (2 * out/3, in)
    full = torch.zeros(out_f, in_f)
    d = out_f // 3
    full[:d], full[2 * d:] = delta[:d], delta[d:]
    return full * (alpha / r)


def test_checkpoints_flow_both_ways(tmp_path):
    """Our model.<step>.pt means in loralib what it means here; loralib's adapter-only and whole-model files
    load here, and a card that does not fit is a clear error."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config())
    model = GPT2LMHeadModel(tiny_config())
    model.load_state_dict(base.state_dict())
    peft_layers.apply_adapter(model, "lora", 4, 32)
    with torch.no_grad():
        for tensor in peft_layers.adapter_state_dict(model).values():
            tensor.normal_(std=0.3)
    adapter_only, whole = tmp_path / "model.3.pt", tmp_path / "model.6.pt"
    gpt2_checkpoint.save_loralib_checkpoint(model, adapter_only, whole=False)
    gpt2_checkpoint.save_loralib_checkpoint(model, whole, whole=True)

    # loralib's arithmetic on our tensors gives our layer's update.
    sd = torch.load(adapter_only, weights_only=True)["model_state_dict"]
    assert set(sd) == {f"module.transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"}
    layer = dict(peft_layers.adapter_layers(model))["transformer.h.1.attn.c_attn"]
    expected = loralib_merged_delta(sd["module.transformer.h.1.attn.c_attn.lora_A"],
                                    sd["module.transformer.h.1.attn.c_attn.lora_B"], 4, 32, 32, 96)
    torch.testing.assert_close(layer.delta_weight().detach(), expected)

    # Both files load back: same logits as the model that wrote them.
    x = torch.randint(0, 50257, (1, 9))
    model.eval()
    with torch.no_grad():
        want = model(x).logits
    args = gpt2_beam.BeamArguments(data="", rank=4, lora_alpha=32)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    for ckpt, extra in ((adapter_only, {"model_name_or_path": str(base_dir)}), (whole, {"model_card": "gpt2.md"})):
        (tmp_path / "config.json").unlink(missing_ok=True)
        if ckpt == whole:
            base.config.to_json_file(tmp_path / "config.json")  # tiny model: its config beside the checkpoint
        args = gpt2_beam.BeamArguments(data="", rank=4, lora_alpha=32, init_checkpoint=str(ckpt), **extra)
        _, loaded, setup = gpt2_beam.load_model(args, "cpu", token_data=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, want, rtol=1e-5, atol=1e-5)
        assert setup["adapter"]["scaling"] == 8

    # Without a config.json the card's architecture is built: the tiny checkpoint does not fit it.
    (tmp_path / "config.json").unlink()
    args = gpt2_beam.BeamArguments(data="", rank=4, lora_alpha=32, init_checkpoint=str(whole), model_card="gpt2.md")
    with pytest.raises(UsageError, match="--model_card gpt2.md is GPT-2 with n_embd 1024 and 24 layers"):
        gpt2_beam.load_model(args, "cpu", token_data=True)
    args = gpt2_beam.BeamArguments(data="", rank=8, init_checkpoint=str(adapter_only), model_name_or_path=str(base_dir))
    with pytest.raises(UsageError, match="rank 4, but --rank/--lora_dim is 8: pass --lora_dim 4"):
        gpt2_beam.load_model(args, "cpu", token_data=True)


def test_label_position_loss_equals_full_loss_and_gradients():
    """The LM head only where a label is: same loss and same adapter gradients as logits at every position."""
    from transformers import GPT2LMHeadModel

    import gpt2_ft
    tokenizer = _tokenizer()
    rows = format_converting(LORA_E2E / "valid.txt", 6)
    examples = gpt2_ft.encode(rows, tokenizer, 512)
    batch = gpt2_ft.make_collate(tokenizer.eos_token_id)(examples)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    peft_layers.apply_adapter(model, "lora", 4, 32, dropout=0.0)
    with torch.no_grad():
        for tensor in peft_layers.adapter_state_dict(model).values():
            tensor.normal_(std=0.2)
    model.train()
    grads = []
    for loss_fn in (gpt2_ft.full_completion_loss, gpt2_ft.completion_loss):
        model.zero_grad()
        loss, n = loss_fn(model, batch, 0.1)
        loss.backward()
        grads.append((loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()
                                              if p.requires_grad}))
    (full_loss, full_n, full_grads), (loss, n, fast_grads) = grads
    assert n == full_n == sum(len([t for t in e["labels"][1:] if t != -100]) for e in examples)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-7)
    for key in full_grads:
        torch.testing.assert_close(fast_grads[key], full_grads[key], rtol=1e-5, atol=1e-8)
    assert not math.isnan(loss.item())


def test_python_mteval_port_hand_worked():
    """measure_scores.py -p: zero n-gram matches are floored at 1e-15 (not MTEval's 1/2^k), lengths may go
    negative, NIST's penalty uses the per-instance average reference length."""
    refs, preds = [["a b c d e"]], ["a b x y z"]
    # p1 = 2/5, p2 = 1/4, no 3- or 4-gram match: 1e-15/3 and 1e-15/2 (MTEval: 1/(2*3) and 1/(4*2)); no brevity
    expected = math.exp((math.log(2 / 5) + math.log(1 / 4) + math.log(1e-15 / 3) + math.log(1e-15 / 2)) / 4)
    assert e2e_eval.port_bleu_nist(refs, preds)[0] == pytest.approx(expected)
    perl_bleu = e2e_eval.mteval_bleu_nist(refs, preds)[0]
    assert perl_bleu == pytest.approx(math.exp((math.log(2 / 5) + math.log(1 / 4) + math.log(1 / 6) + math.log(1 / 8))
                                               / 4))
    # NIST on references "a b" and "a b c d" (6 words): info(a) = info(b) = log2(6/2), info(c) = info(d) =
    # log2(6/1); info(b c) = log2(2/1) = 1, info(a b c) = log2(2/1) = 1, the other matches 0. Output "a b c d e":
    # per order, information over the output's n-gram count (5, 4, 3, 2, 1); its length 5 >= avg 3: no penalty.
    want = (2 * math.log2(3) + 2 * math.log2(6)) / 5 + 1 / 4 + 1 / 3
    assert e2e_eval.port_bleu_nist([["a b", "a b c d"]], ["a b c d e"])[1] == pytest.approx(want)
    # "a b" has no 3-gram at all: the port divides by zero (and crashes); here it is one clear error.
    with pytest.raises(UsageError, match="no 3-grams"):
        e2e_eval.port_bleu_nist([["a b", "a b c d"]], ["a b"])


def test_no_repeat_ngram_counts_generated_tokens_only(gpt2_tokenizer):
    """microsoft/LoRA bans a repeated n-gram within the generated text; Hugging Face's no_repeat_ngram_size also
    counts the prompt, which would forbid copying `Café Adriatic` (4 tokens) from the meaning representation."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
    prompt = gpt2_tokenizer.encode("name : Café Adriatic | near : The Rice Boat") + [EOT]
    generated = gpt2_tokenizer.encode(" near Café Adriatic")[:-1]  # ... Café, Ad, ri -> next should be `atic`
    atic = gpt2_tokenizer.encode(" Café Adriatic")[-1]
    ids = torch.tensor([prompt + generated])
    ours = gpt2_beam.GeneratedNoRepeatNGram(4, len(prompt))(ids, torch.zeros(1, 50257))
    hf = NoRepeatNGramLogitsProcessor(4)(ids, torch.zeros(1, 50257))
    assert ours[0, atic] == 0 and hf[0, atic] == -float("inf")
    # Within the generated text the rule holds: `a b c d a b c` may not continue with `d`.
    a_b_c_d = gpt2_tokenizer.encode(" the pub is cheap")
    ids = torch.tensor([prompt + a_b_c_d + a_b_c_d[:3]])
    ours = gpt2_beam.GeneratedNoRepeatNGram(4, len(prompt))(ids, torch.zeros(1, 50257))
    assert ours[0, a_b_c_d[3]] == -float("inf") and (ours[0] == -float("inf")).sum() == 1


def microsoft_lora_beam(model, prompt, beam, eval_len, length_penalty, no_repeat, eos):
    """microsoft/LoRA gpt2_beam.py's search for one prompt, written out (no KV cache): bans (the no-repeat rule over
    the generated tokens) act on the logits, then log-softmax; a beam that emits an end token is a finished
    candidate scored by its sum / length ** length_penalty, and the best candidate or final beam wins."""
    scores, history, best = torch.zeros(beam), None, (-float("inf"), None)
    for step in range(eval_len):
        ids = torch.tensor([prompt] * beam) if history is None else torch.cat([torch.tensor([prompt] * beam),
                                                                              history], 1)
        logits = model(ids).logits[:, -1].float()
        if history is not None and step + 1 >= no_repeat:
            for row, tokens in enumerate(history.tolist()):
                prefix = tokens[step + 1 - no_repeat:]
                for i in range(step - no_repeat + 1):
                    if tokens[i:i + no_repeat - 1] == prefix:
                        logits[row, tokens[i + no_repeat - 1]] = -float("inf")
        logprobs = logits.log_softmax(-1)
        vocab = logprobs.shape[-1]
        total = logprobs[0] if history is None else (scores[:, None] + logprobs).view(-1)
        scores, top = total.topk(beam)
        rows, tokens = top // vocab, (top % vocab)[:, None]
        history = tokens if history is None else torch.cat([history[rows], tokens], 1)
        for row in range(beam):
            if history[row, -1].item() in eos:
                best = max(best, (scores[row].item() / history.shape[1] ** length_penalty, history[row].tolist()))
                scores[row] = -float("inf")
    for row in range(beam):
        best = max(best, (scores[row].item() / history.shape[1] ** length_penalty, history[row].tolist()))
    return best[1]


def test_beam_search_bans_tokens_before_the_softmax_as_microsoft_lora(gpt2_tokenizer):
    """A banned token's probability goes to the rest of its beam's tokens, as in microsoft/LoRA, where the ban acts
    on the logits before the softmax (generate bans in log-probabilities; renormalize_logits restores it). A peaked
    random model (logits x 30) makes the no-repeat rule bite; no beam ends here, so the two searches' bookkeeping
    of finished beams (a documented difference) does not enter."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).eval()
    model.lm_head.register_forward_hook(lambda module, args, out: out * 30)
    args = SimpleNamespace(eval_len=10, seq_len=256, min_length=0, beam=4, length_penalty=0.8,
                           no_repeat_ngram_size=4, repetition_penalty=1.0)
    lines = (LORA_E2E / "test.txt").read_text().splitlines()
    contexts = list(dict.fromkeys(line.split("||")[0] for line in lines))[:8]
    differ = 0
    for context in contexts:
        prompt = gpt2_tokenizer.encode(context) + [EOT]
        theirs = microsoft_lora_beam(model, prompt, 4, 10, 0.8, 4, [EOT])
        ours, ended = gpt2_beam.generate_batch(model, EOT, [prompt], args, "cpu", [EOT])[0]
        assert not ended and ours == theirs, context
        differ += theirs != microsoft_lora_beam(model, prompt, 4, 10, 0.8, 10**9, [EOT])
    assert differ >= 2  # the rule changed these searches' outcome, so the test sees where it acts
