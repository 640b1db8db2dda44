"""E2E data conversion (e2e_data.py) and the scorer's file layout written by gpt2_decode.py, on real E2E rows."""
import json
import re
import subprocess
import sys

import pytest
from conftest import DATA_DIR, REPO

import e2e_eval
import gpt2_decode
from common import UsageError
from e2e_data import group_references, load_e2e, mr_to_lora_format

E2E = DATA_DIR / "e2e"


def test_csv_and_lora_txt_give_the_same_examples():
    csv_rows = load_e2e(E2E / "original" / "devset.csv")
    txt_rows = load_e2e(E2E / "lora_format" / "valid.txt")
    assert len(csv_rows) == len(txt_rows) == 4672
    assert csv_rows[0] == {"context": "name : Alimentum | area : city centre | family friendly : no",
                           "completion": "There is a place in the city centre, Alimentum, that is not family-friendly."}
    # Same meaning representations in the same order; LoRA's files also put spaces inside values ("£ 20 - 25").
    squash = lambda s: s.replace(" ", "")  # noqa: E731
    assert [squash(r["context"]) for r in csv_rows] == [squash(r["context"]) for r in txt_rows]
    contexts, refs = group_references(csv_rows)
    assert len(contexts) == 547 and sum(len(refs[c]) for c in contexts) == 4672


def test_test_set_has_630_distinct_meaning_representations():
    contexts, refs = group_references(load_e2e(E2E / "lora_format" / "test.txt"))
    assert len(contexts) == 630 and sum(map(len, refs.values())) == 4693


def test_mr_layout_and_errors(tmp_path):
    assert mr_to_lora_format("name[The Eagle], eatType[pub], priceRange[£20-25], familyFriendly[yes]") == \
        "name : The Eagle | Type : pub | price : £20-25 | family friendly : yes"
    bad = tmp_path / "bad.txt"
    bad.write_text("name : X | Type : pub\n")
    with pytest.raises(UsageError, match="no `\\|\\|`"):
        load_e2e(bad)
    (tmp_path / "x.tsv").write_text("a")
    with pytest.raises(UsageError, match="unknown data format"):
        load_e2e(tmp_path / "x.tsv")


def test_converter_cli_writes_jsonl(tmp_path):
    out = tmp_path / "dev.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "e2e_data.py"), "--input", str(E2E / "original" / "devset.csv"),
                           "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == load_e2e(E2E / "original" / "devset.csv") == load_e2e(out)
    assert "547 distinct" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "e2e_data.py"), "--input", str(tmp_path / "nope.csv"),
                           "--output", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'nope.csv'}"]
    assert not (tmp_path / "x.jsonl").exists()


def dev_subset(tmp_path, n_mrs=5):
    """The first rows of the real dev set covering n_mrs meaning representations, as JSONL."""
    rows = load_e2e(E2E / "original" / "devset.csv")
    contexts, _ = group_references(rows)
    keep = set(contexts[:n_mrs])
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["context"] in keep))
    return path, contexts[:n_mrs]


def test_decode_writes_the_official_scorer_layout(tmp_path):
    data, contexts = dev_subset(tmp_path)
    # Fake gpt2_beam.py output, in shuffled order, with the endings a model produces.
    texts = [" The first one.<|endoftext|> junk", " Second\n\nthird paragraph", " Three\nlines  here",
             " Four<|endoftext|>", " Five."]
    samples = tmp_path / "predict.jsonl"
    samples.write_text("".join(json.dumps({"id": i, "context": contexts[i], "token_ids": [], "text": texts[i]}) + "\n"
                               for i in (3, 0, 4, 1, 2)))
    ref_file, pred_file = tmp_path / "ref.txt", tmp_path / "pred.txt"
    assert gpt2_decode.write_decode_files(data, samples, ref_file, pred_file) == 5
    assert pred_file.read_text().splitlines() == ["The first one.", "Second", "Three lines here", "Four", "Five."]
    _, refs = group_references(load_e2e(data))
    # microsoft/LoRA's layout: each group's references, then a blank line (after the last group too)
    assert ref_file.read_text(encoding="utf-8") == "".join("".join(r + "\n" for r in refs[c]) + "\n" for c in contexts)
    assert e2e_eval.read_references(ref_file) == [refs[c] for c in contexts]  # what the scorer will read

    most = max(len(refs[c]) for c in contexts)
    gpt2_decode.write_decode_files(data, samples, tmp_path / "refs_dir", tmp_path / "p.txt", ref_type="webnlg",
                                   ref_num=most + 1, lower=True)
    for slot in (0, most - 1, most):
        lines = (tmp_path / "refs_dir" / f"reference{slot}").read_text(encoding="utf-8").splitlines()
        assert lines == [refs[c][slot].lower() if slot < len(refs[c]) else "" for c in contexts]

    # microsoft/LoRA's WebNLG/DART flags: --tokenize splits off every non-word character (after --lower);
    # --filter seen|unseen keeps the inputs by their `cate` field
    seen = set(contexts[::2])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "cate": r["context"] in seen}) + "\n" for r in rows))
    assert gpt2_decode.write_decode_files(data, samples, tmp_path / "rt.txt", tmp_path / "pt.txt", lower=True,
                                          tokenize=True, keep="seen") == 3
    assert (tmp_path / "pt.txt").read_text().splitlines() == ["the first one .", "three lines here", "five ."]
    expected = [" ".join(re.findall(r"\w+|[^\w\s]", ref.lower())) for ref in refs[contexts[0]]]
    assert e2e_eval.read_references(tmp_path / "rt.txt")[0] == expected
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="--filter unseen needs the `cate` field"):
        gpt2_decode.write_decode_files(dev_subset(tmp_path / "plain")[0], samples, tmp_path / "ru.txt",
                                       tmp_path / "pu.txt", keep="unseen")

    samples.write_text(json.dumps({"id": 0, "context": contexts[0], "text": "x"}) + "\n")
    with pytest.raises(UsageError, match="no prediction for 4 of 5"):
        gpt2_decode.write_decode_files(data, samples, tmp_path / "r2.txt", tmp_path / "p2.txt")
    assert not (tmp_path / "r2.txt").exists()
