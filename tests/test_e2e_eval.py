"""E2E scorer (e2e_eval.py): each metric against hand-worked examples and against numbers of the official
E2E scorer (tuetschek/e2e-metrics measure_scores.py with its Perl MTEval), plus the file formats and errors."""
import json
import math
import os
import shutil

import pytest

import e2e_eval
from common import UsageError

# A small input that exercises MTEval's corners: references of different counts per instance (padded with empty
# segments in the SGML files), SGML entities, digits around '.', ',' and '-', non-ASCII text, an upper-case and an
# empty prediction, and the word "0", which Perl treats as false when it computes the information of "0 x".
TRICKY_REFS = [
    ["The Eagle is a cheap coffee shop near Burger King.",
     "Near Burger King, The Eagle serves cheap food & drinks.",
     "0 stars: The Eagle, £20-25, 3.5 miles away."],
    ["Zizzi is a family-friendly pub; it's rated 5 out of 5.",
     'Zizzi (a pub) is "kid friendly" &amp; rated high.'],
    ["Café Rouge serves French food in the riverside area."],
    ["0 0 x 0 y", "Loch Fyne: less than £20, near The Rice Boat.", "Loch Fyne is in the city centre.",
     "It is naïve to skip Loch Fyne — a great place."],
]
TRICKY_PREDS = ["The Eagle is a cheap coffee shop near Burger King.",
                "ZIZZI is a kid-friendly pub rated 5 out of 5 &quot;high&quot;",
                "",
                "0 x 0 y Loch Fyne is near The Rice Boat, less than £20."]
# measure_scores.py (Perl MTEval v13a-sig + pycocoevalcap 1.2 jars) on exactly these two files, printed to 4 places.
OFFICIAL_TRICKY = {"BLEU": 0.5340, "NIST": 6.2016, "METEOR": 0.4089, "ROUGE_L": 0.5860, "CIDEr": 2.2498}


def write_pair(tmp_path, refs, preds):
    ref_file, pred_file = tmp_path / "refs.txt", tmp_path / "preds.txt"
    ref_file.write_text("\n".join("".join(r + "\n" for r in group) for group in refs), encoding="utf-8")
    pred_file.write_text("".join(p + "\n" for p in preds), encoding="utf-8")
    return ref_file, pred_file


@pytest.mark.parametrize("text,tokens", [
    ("Hello, World.", "hello , world ."),
    ("£20-25, 3.5 stars", "£20 - 25 , 3.5 stars"),   # '-' split only after a digit; '.' kept between digits
    ("family-friendly", "family-friendly"),
    ("it's \"kid friendly\"", "it's \" kid friendly \""),
    ("A &amp; B &quot;C&quot; &lt;D&gt;", "a & b \" c \" < d >"),
    ("CAFÉ Naïve", "cafÉ naïve"),                      # tr/A-Z/a-z/ lower-cases ASCII only
    ("  spaced\u00a0out\t", "spaced out"),
    ("<skipped> end", "end"),
])
def test_mteval_tokenization(text, tokens):
    assert " ".join(e2e_eval.mteval_tokenize(text)) == tokens


def test_bleu_hand_worked():
    bleu, _ = e2e_eval.mteval_bleu_nist([["the cat sat on the mat"]], ["the cat sat on the mat"])
    assert bleu == pytest.approx(1.0)
    # p1 = 3/4, p2 = 1/3, no 3-gram match -> 1/(2*2), no 4-gram match -> 1/(4*1); lengths equal, no penalty.
    bleu, _ = e2e_eval.mteval_bleu_nist([["a b x d"]], ["a b c d"])
    assert bleu == pytest.approx((0.75 * (1 / 3) * 0.25 * 0.25) ** 0.25)
    # Brevity penalty against the closest reference length (3 of {3, 6}): none; the 2-word output gets exp(1 - 3/2).
    bleu, _ = e2e_eval.mteval_bleu_nist([["a b c", "a b c d e f"]], ["a b c"])
    assert bleu == pytest.approx(1.0)
    bleu, _ = e2e_eval.mteval_bleu_nist([["a b c"]], ["a b"])
    assert bleu == pytest.approx(math.exp(1 - 3 / 2))  # no 3-/4-grams in the output: those orders count as 1


def test_nist_hand_worked():
    # Reference "a b": info(a) = info(b) = -log2(1/2) = 1, info(a b) = -log2(1/1) = 0 -> (1 + 1)/2 + 0 = 1.
    assert e2e_eval.mteval_bleu_nist([["a b"]], ["a b"])[1] == pytest.approx(1.0)
    # Reference "0 x 0 y": info("0 x") divides by the word total (Perl's "0" is false): -log2(1/4) = 2;
    # unigrams: info(0) = -log2(2/4) = 1, info(x) = 2 -> 3/2; bigram 2/1; length ratio 2/4 -> penalty.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = (1.5 + 2.0) * math.exp(-beta * math.log(0.5) ** 2)
    assert e2e_eval.mteval_bleu_nist([["0 x 0 y"]], ["0 x"])[1] == pytest.approx(expected)


def test_bleu_nist_match_official_scorer():
    bleu, nist = e2e_eval.mteval_bleu_nist(TRICKY_REFS, TRICKY_PREDS)
    assert bleu == pytest.approx(OFFICIAL_TRICKY["BLEU"], abs=1e-4)
    assert nist == pytest.approx(OFFICIAL_TRICKY["NIST"], abs=1e-4)


def test_rouge_and_cider_hand_worked():
    # ROUGE_L: LCS("a b c", "a c d e f") = 2, P = 2/3, R = 2/5, beta = 1.2.
    p, r = 2 / 3, 2 / 5
    rouge = (1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p)
    # CIDEr-D on two instances that each match their one reference: every n-gram has idf log(2); 1- and 2-gram
    # cosines are 1, 3- and 4-grams are absent -> mean 0.5, times 10.
    scores = e2e_eval.rouge_and_cider({"i0": ["a c d e f"], "i1": ["c d"]}, {"i0": ["a b c"], "i1": ["c d"]})
    assert scores["ROUGE_L"] == pytest.approx((rouge + 1.0) / 2)
    scores = e2e_eval.rouge_and_cider({"i0": ["a b"], "i1": ["c d"]}, {"i0": ["a b"], "i1": ["c d"]})
    assert scores["CIDEr"] == pytest.approx(5.0)


def test_reference_file_layout(tmp_path):
    ref_file, pred_file = write_pair(tmp_path, TRICKY_REFS, TRICKY_PREDS)
    assert e2e_eval.read_references(ref_file) == TRICKY_REFS
    assert e2e_eval.read_predictions(pred_file) == TRICKY_PREDS
    single = tmp_path / "single.txt"
    single.write_text("one\ntwo\nthree\n")
    assert e2e_eval.read_references(single) == [["one"], ["two"], ["three"]]
    doubled = tmp_path / "doubled.txt"
    doubled.write_text("a\n\n\nb\n")
    with pytest.raises(UsageError, match="instance 2 has no reference"):
        e2e_eval.read_references(doubled)


def test_bad_input_is_one_clear_error(tmp_path, monkeypatch):
    ref_file, pred_file = write_pair(tmp_path, TRICKY_REFS, TRICKY_PREDS[:3])
    with pytest.raises(UsageError, match="4 reference groups but 3 predictions"):
        e2e_eval.score_files(ref_file, pred_file, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(UsageError, match="file not found"):
        e2e_eval.score_files(tmp_path / "missing.txt", pred_file)
    monkeypatch.setattr(e2e_eval.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="apt-get install -y default-jre-headless"):
        e2e_eval.compute_scores(TRICKY_REFS, TRICKY_PREDS)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
def test_all_metrics_match_official_scorer(tmp_path):
    ref_file, pred_file = write_pair(tmp_path, TRICKY_REFS, TRICKY_PREDS)
    out = tmp_path / "scores.json"
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    scores = e2e_eval.score_files(ref_file, pred_file, out)
    assert os.getpriority(os.PRIO_PROCESS, 0) == priority  # only the helper thread yields the CPU to METEOR
    for metric, official in OFFICIAL_TRICKY.items():
        assert scores[metric] == pytest.approx(official, abs=1e-4), metric
    saved = json.loads(out.read_text())
    assert saved["paper_style"]["BLEU"] == pytest.approx(53.40, abs=0.01)
    assert saved["paper_style"]["CIDEr"] == pytest.approx(2.2498, abs=1e-4)
    assert saved["instances"] == 4


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_dead_meteor_jvm_is_one_clear_error():
    meteor = e2e_eval.MeteorProcess()
    meteor.proc.kill()
    meteor.proc.wait()
    with pytest.raises(RuntimeError, match="METEOR failed"):
        meteor.score({"a": ["the eagle is a pub"]}, {"a": ["the eagle is a cafe"]})
    meteor.close()
