"""Score generated texts with the E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE_L and CIDEr.

The numbers are those of the challenge's official scorer (tuetschek/e2e-metrics, measure_scores.py):
  - BLEU and NIST as its MTEval Perl script (mteval-v13a-sig.pl) computes them: its tokenisation, 9-gram
    information weights, closest-reference brevity penalty, smoothed BLEU, and NIST averaged over the number of
    non-empty references. Re-implemented here in Python (no Perl), same arithmetic.
  - METEOR 1.5, ROUGE_L and CIDEr through pycocoevalcap (the same Java PTB tokenizer and METEOR jar, the same
    Python ROUGE_L/CIDEr code the official scorer vendors).
It takes at most half the official scorer's time here (0.40-0.50, bench/bench_e2e.py). METEOR's JVM (about 6 s
and 10 CPU-s to load its paraphrase table) is the critical path: it starts first, gets its requests in one write,
and the Python metrics run beside it in a low-priority thread; the Perl MTEval pass is replaced by a short Python
one.

Input: a reference file (references of one instance on consecutive lines, instances separated by one blank
line; a file without blank lines holds one reference per instance) and a prediction file (one line per
instance, same order) -- the two files gpt2_decode.py writes.

    python e2e_eval.py --ref_file refs.txt --pred_file preds.txt --output_json scores.json
    python e2e_eval.py e2e_ref.txt e2e_pred.txt -p         # measure_scores.py's command line, as microsoft/LoRA runs it

`-p` (measure_scores.py's --python) computes BLEU and NIST as the official scorer's Python MTEval port does, which
is how microsoft/LoRA's README scores E2E; its numbers differ slightly from the Perl script's (see port_bleu_nist).
METEOR, ROUGE_L and CIDEr are the same either way.
"""
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import UsageError, atomic_write_json, check_not_input, read_text, run_main

METRICS = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]


class JavaError(UsageError, RuntimeError):
    """`java` is there but METEOR or the PTB tokenizer failed in it: one line, with the JVM's last words."""
JAVA_MISSING = ("Java is needed for METEOR and the PTB tokenizer but `java` is not on PATH; install a Java runtime "
                "(8 or newer), e.g. `sudo apt-get install -y default-jre-headless`, then run again")


# ----------------------------------------------------------------------------------------------------------------
# Reading the two files exactly as measure_scores.py does (codecs-style line splitting, each line stripped).

def read_predictions(path, what="prediction file"):
    return [line.strip() for line in read_text(path, what).splitlines()]


def read_references(path):
    """References grouped per instance: consecutive lines, groups separated by a blank line."""
    groups = [[]]
    for line in read_predictions(path, "reference file"):
        if line:
            groups[-1].append(line)
        else:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if len(groups) == 1:  # no blank line at all: a single-reference file
        groups = [[ref] for ref in groups[0]]
    for i, group in enumerate(groups):
        if not group:
            raise UsageError(f"{path}: instance {i + 1} has no reference (two blank lines in a row?); "
                             "separate the reference groups by exactly one blank line")
    return groups


# ----------------------------------------------------------------------------------------------------------------
# MTEval (mteval-v13a-sig.pl) BLEU and NIST.

# Perl's \s on character strings; Python's \s also matches \x1c-\x1f, which Perl keeps inside words.
PERL_SPACE = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_PERL_SPACES = re.compile(PERL_SPACE + "+")
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE = re.compile(r"([.,])([^0-9])")
_DIGIT_DASH = re.compile(r"([0-9])(-)")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
BLEU_ORDER, NIST_ORDER = 4, 5


def mteval_tokenize(text):
    """One segment as MTEval sees it: measure_scores.py writes it raw into an SGML file, the Perl reader joins
    whitespace runs, then its default (non-international) tokenisation runs."""
    text = _PERL_SPACES.sub(" ", text)
    text = text.replace("<skipped>", "")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} ".translate(_ASCII_LOWER)  # tr/[A-Z]/[a-z]/: ASCII letters only
    text = _PUNCT.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", text)
    text = _DIGIT_DASH.sub(r"\1 \2 ", text)
    text = _PERL_SPACES.sub(" ", text).strip(" ")
    return text.split(" ") if text else []


def _ngram_counts(words, max_n):
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def mteval_bleu_nist(references, predictions):
    """System-level (BLEU, NIST) of mteval-v13a-sig.pl as run by measure_scores.py (one document, references
    padded with empty segments where an instance has fewer of them)."""
    refs = [[mteval_tokenize(r) for r in group] for group in references]
    hyps = [mteval_tokenize(p) for p in predictions]

    # Information weight of each n-gram from all reference segments: -log2(count(w1..wn) / count(w1..wn-1)).
    # Orders above 5 never reach BLEU-4 or NIST-5, so they are not counted.
    ngram_count = Counter()
    total_words = 0
    for group in refs:
        for words in group:
            total_words += len(words)
            ngram_count.update(_ngram_counts(words, NIST_ORDER))

    def info(ngram):
        prefix = ngram[:-1]
        # Perl tests the joined prefix for truth: "" and the single word "0" are false -> divide by total words.
        if not prefix or prefix == ("0",):
            return -math.log(ngram_count[ngram] / total_words) / math.log(2)
        return -math.log(ngram_count[ngram] / ngram_count[prefix]) / math.log(2)

    ref_length = 0          # sum of closest reference lengths
    n_refs = 0              # non-empty references, summed over segments
    ref_words = 0           # reference unigrams, summed
    match = [0] * (NIST_ORDER + 1)
    hyp_ngrams = [0] * (NIST_ORDER + 1)
    hyp_info = [0.0] * (NIST_ORDER + 1)
    for group, hyp in zip(refs, hyps, strict=True):
        hyp_len = len(hyp)
        for n in range(1, NIST_ORDER + 1):
            hyp_ngrams[n] += max(hyp_len - n + 1, 0)
        max_ref_counts = Counter()
        for words in group:
            max_ref_counts |= _ngram_counts(words, NIST_ORDER)
            ref_words += len(words)
            n_refs += bool(words)
        # Closest reference length, ties to the shorter; empty references are skipped, except the first one,
        # which seeds the Perl loop.
        lengths = [len(group[0])] + [len(w) for w in group[1:] if w]
        ref_length += min(lengths, key=lambda r: (abs(hyp_len - r), r))
        for ngram, count in _ngram_counts(hyp, NIST_ORDER).items():
            if ngram in max_ref_counts:
                clipped = min(count, max_ref_counts[ngram])
                match[len(ngram)] += clipped
                hyp_info[len(ngram)] += info(ngram) * clipped

    # BLEU with MTEval's smoothing: the k-th zero n-gram match count becomes 1/2^k.
    brevity = math.exp(min(0.0, 1 - ref_length / hyp_ngrams[1])) if hyp_ngrams[1] > 0 else 0.0
    log_precision, smooth = 0.0, 1
    for n in range(1, BLEU_ORDER + 1):
        if hyp_ngrams[n] == 0:
            continue
        if match[n] == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * hyp_ngrams[n]))
        else:
            log_precision += math.log(match[n] / hyp_ngrams[n])
    bleu = math.exp(log_precision / BLEU_ORDER) * brevity

    # NIST: information-weighted matches, length penalty against the average reference length.
    if ref_words == 0:
        raise UsageError("every reference is empty after MTEval tokenisation; NIST is undefined")
    avg_refs = n_refs / len(refs)
    ratio = hyp_ngrams[1] / (ref_words / avg_refs)
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) * math.log(ratio))
    nist = sum(hyp_info[n] / max(hyp_ngrams[n], 1) for n in range(1, NIST_ORDER + 1)) * penalty
    return bleu, nist


# measure_scores.py -p: BLEU and NIST by its Python port of MTEval (pymteval), which the LoRA paper's E2E numbers
# used. It differs from the Perl script: Unicode lower-casing of n-grams, BLEU's zero counts floored at 1e-15
# instead of MTEval's 1/2^k smoothing, NIST's length penalty against the sum of per-instance average reference
# lengths, no special case for the word "0", and an empty text counted as one empty token.

def port_tokenize(text):
    """pymteval's tokenisation (no lower-casing here: it lower-cases n-grams)."""
    text = text.replace("<skipped>", "")
    text = re.sub(r"-\n", "", text).replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = _PUNCT.sub(r" \1 ", f" {text} ")
    text = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", text)
    text = _DIGIT_DASH.sub(r"\1 \2 ", text)
    return re.sub(r"\s+", " ", text).strip().split(" ")


def _port_counts(words, n):
    return Counter(tuple(w.lower() for w in words[i:i + n]) for i in range(len(words) - n + 1))


def port_bleu_nist(references, predictions):
    """(BLEU, NIST) as measure_scores.py -p computes them."""
    refs = [[port_tokenize(r) for r in group] for group in references]
    hyps = [port_tokenize(p) for p in predictions]
    bleu_hits, bleu_lens, closest = [0] * BLEU_ORDER, [0] * BLEU_ORDER, 0
    ref_counts = [Counter() for _ in range(NIST_ORDER + 1)]  # order 0: total reference words
    nist_hits = [Counter() for _ in range(NIST_ORDER)]
    nist_lens, avg_ref_len = [0] * NIST_ORDER, 0.0
    for group, hyp in zip(refs, hyps, strict=True):
        for n in range(1, NIST_ORDER + 1):
            merged = Counter()
            for words in group:
                merged |= _port_counts(words, n)
            clipped = {g: min(c, merged[g]) for g, c in _port_counts(hyp, n).items() if merged[g]}
            if n <= BLEU_ORDER:
                bleu_hits[n - 1] += sum(clipped.values())
                bleu_lens[n - 1] += len(hyp) - n + 1  # negative for short outputs, as in the port
            nist_hits[n - 1].update(clipped)
            nist_lens[n - 1] += len(hyp) - n + 1
            for words in group:
                ref_counts[n].update(_port_counts(words, n))
        closest += len(min(group, key=lambda r: (abs(len(r) - len(hyp)), len(r))))
        ref_counts[0][()] += sum(len(r) for r in group)
        avg_ref_len += sum(len(r) for r in group) / len(group)

    brevity = 1.0
    if bleu_lens[0] <= closest:
        brevity = math.exp(1.0 - closest / (bleu_lens[0] if bleu_lens[0] else 1e-5))
    log_precision = sum(math.log(max(h, 1e-15) / max(n, 1e-9)) for h, n in zip(bleu_hits, bleu_lens, strict=True))
    bleu = brevity * math.exp(log_precision / BLEU_ORDER)

    def info(ngram):
        return math.log(ref_counts[len(ngram) - 1][ngram[:-1]] / ref_counts[len(ngram)][ngram], 2)

    nist = 0.0
    for n in range(NIST_ORDER):
        if nist_lens[n] == 0:  # the port divides by zero here
            raise UsageError(f"the predictions hold no {n + 1}-grams in all (too short); NIST of measure_scores.py "
                             "-p is undefined for them")
        nist += sum(info(g) * c for g, c in nist_hits[n].items()) / nist_lens[n]
    ratio = nist_lens[0] / avg_ref_len if avg_ref_len else 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return bleu, nist * penalty


# ----------------------------------------------------------------------------------------------------------------
# MS-COCO caption metrics (pycocoevalcap): PTB tokenisation, METEOR (Java), ROUGE_L and CIDEr (Python).

def _require_pycocoevalcap():
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        raise UsageError("pycocoevalcap is not installed; `pip install pycocoevalcap==1.2` (it ships the METEOR "
                         "and PTB tokenizer jars)") from None


def ptb_tokenize(sentences):
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, -preserveLines -lowerCase, punctuation dropped),
    for all sentences in one JVM start."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="e2e-ptb-") as tmp:
        text_file = Path(tmp) / "sentences.txt"
        text_file.write_bytes("\n".join(s.replace("\n", " ") for s in sentences).encode())
        proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(text_file)], capture_output=True)
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()
            raise JavaError(f"the PTB tokenizer failed in Java (exit {proc.returncode}: "
                            f"{said[-1] if said else 'no message'}); check that `java -version` works (Java 8+)")
        out = proc.stdout.decode()
    lines = out.split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[:len(sentences)]]


def rouge_and_cider(gts, res):
    """ROUGE_L and CIDEr of pycocoevalcap on PTB-tokenised {instance: [refs]} / {instance: [prediction]}."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    return {"ROUGE_L": float(Rouge().compute_score(gts, res)[0]), "CIDEr": float(Cider().compute_score(gts, res)[0])}


class MeteorProcess:
    """METEOR 1.5 in its own JVM: the jar, flags and request lines of pycocoevalcap's Meteor wrapper (so the same
    scores), started as early as possible because loading the paraphrase table takes about 6 s and 10 CPU-s.

    Unlike the wrapper, which waits for each answer before it sends the next request, all requests go out in one
    write from a helper thread: the JVM then never waits on this (possibly busy) Python process."""

    def __init__(self):
        if shutil.which("java") is None:
            raise UsageError(JAVA_MISSING)
        _require_pycocoevalcap()
        from pycocoevalcap.meteor import meteor
        self.proc = subprocess.Popen(["java", "-jar", "-Xmx2G", meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en",
                                      "-norm"], cwd=Path(meteor.__file__).parent,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def _exchange(self, requests, n_answers):
        def write():
            try:
                self.proc.stdin.write("".join(r + "\n" for r in requests).encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):  # the JVM died; reading below reports it
                pass
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answers = [self.proc.stdout.readline() for _ in range(n_answers)]
        writer.join()
        if not answers or not answers[-1].endswith(b"\n"):
            self.proc.kill()
            stderr = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise JavaError(f"METEOR failed: {stderr[-1] if stderr else 'the JVM exited without an answer'}; check "
                            "that `java -version` works (Java 8+) and that 2 GB of memory are free")
        return [a.decode().strip() for a in answers]

    def score(self, gts, res):
        """Corpus METEOR of {instance: [PTB-tokenised refs]} / {instance: [prediction]}, as pycocoevalcap's
        Meteor.compute_score: one SCORE request per instance, then one EVAL over all their statistics."""
        requests = [" ||| ".join(("SCORE", " ||| ".join(gts[i]), res[i][0].replace("|||", "").replace("  ", " ")))
                    for i in gts]
        stats = self._exchange(requests, len(requests))
        # EVAL answers one score per instance, then the corpus score.
        return float(self._exchange(["EVAL ||| " + " ||| ".join(stats)], len(requests) + 1)[-1])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _yield_cpu_to_meteor():
    """Lower this thread's priority (Linux: nice is per thread). The METEOR JVM is the critical path of scoring;
    the Python metrics finish well within its time even when they only get the CPU it leaves."""
    if sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + 10, 19))
        except OSError:
            pass


def compute_scores(references, predictions, meteor=None, mteval="perl"):
    """All five E2E metrics for per-instance reference lists and one prediction per instance. `meteor`: a
    MeteorProcess the caller started earlier (and closes); by default one is started and closed here. `mteval`:
    "perl" (measure_scores.py's default) or "python" (its -p: the pymteval port's BLEU/NIST)."""
    bleu_nist = {"perl": mteval_bleu_nist, "python": port_bleu_nist}[mteval]
    if len(references) != len(predictions):
        raise UsageError(f"{len(references)} reference groups but {len(predictions)} predictions; "
                         "the files must describe the same instances in the same order")
    if not references:
        raise UsageError("nothing to score: no instances")
    with contextlib.nullcontext(meteor) if meteor else MeteorProcess() as meteor:
        ref_texts = [r for group in references for r in group]
        tokenized = ptb_tokenize(ref_texts + list(predictions))  # needs a JVM of its own, but only for 0.5 s
        gts, res, pos = {}, {}, 0
        for i, group in enumerate(references):
            gts[f"inst-{i}"] = tokenized[pos:pos + len(group)]
            pos += len(group)
        for i in range(len(predictions)):
            res[f"inst-{i}"] = [tokenized[len(ref_texts) + i]]

        # BLEU/NIST, ROUGE_L and CIDEr in a low-priority thread while this one waits for METEOR.
        python_scores = {}

        def python_metrics():
            try:
                _yield_cpu_to_meteor()
                bleu, nist = bleu_nist(references, predictions)
                python_scores.update(BLEU=bleu, NIST=nist, **rouge_and_cider(gts, res))
            except BaseException as e:  # re-raised in the calling thread
                python_scores["error"] = e

        worker = threading.Thread(target=python_metrics)
        worker.start()
        try:
            meteor_score = meteor.score(gts, res)
        finally:
            worker.join()
    if "error" in python_scores:
        raise python_scores["error"]
    return {m: meteor_score if m == "METEOR" else python_scores[m] for m in METRICS}


def paper_style(scores):
    """The LoRA paper's E2E table: BLEU, METEOR and ROUGE-L in percent, NIST and CIDEr as they are."""
    return {"BLEU": round(100 * scores["BLEU"], 2), "NIST": round(scores["NIST"], 4),
            "METEOR": round(100 * scores["METEOR"], 2), "ROUGE_L": round(100 * scores["ROUGE_L"], 2),
            "CIDEr": round(scores["CIDEr"], 4)}


def format_scores(scores):
    official = "\n".join(f"{m}: {scores[m]:.4f}" for m in METRICS)
    paper = paper_style(scores)
    return (f"SCORES:\n==============\n{official}\n\n"
            "LoRA-paper style: " + "  ".join(f"{m} {paper[m]}" for m in METRICS))


def score_files(ref_file, pred_file, output_json=None, meteor=None, mteval="perl"):
    for path in (ref_file, pred_file):
        if not os.path.isfile(path):
            raise UsageError(f"file not found: {path}")
    if output_json:
        check_not_input(output_json, ref_file, pred_file)
    references, predictions = read_references(ref_file), read_predictions(pred_file)
    scores = compute_scores(references, predictions, meteor, mteval)
    if output_json:
        atomic_write_json(output_json, {**scores, "paper_style": paper_style(scores), "instances": len(predictions),
                                        "mteval": mteval, "ref_file": str(ref_file), "pred_file": str(pred_file)})
    return scores


@dataclass
class EvalArguments:
    ref_file: str = field(metadata={"help": "References: one per line, instances separated by a blank line "
                                            "(also the first positional argument, as measure_scores.py takes it)."})
    pred_file: str = field(metadata={"help": "Predictions: one line per instance, same order (or 2nd positional)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the scores here (JSON)."})
    python: bool = field(default=False, metadata={
        "aliases": ["-p"], "help": "BLEU/NIST by measure_scores.py's Python MTEval port (its -p), as the LoRA paper "
                                   "scored E2E; default: its Perl MTEval"})


def positional_files(argv):
    """measure_scores.py's command line `REF_FILE SYS_FILE [-p]` -> --ref_file/--pred_file."""
    bare = [a for a in argv if not a.startswith("-")]
    if "--ref_file" in argv or "--pred_file" in argv or not bare:
        return argv
    if len(bare) != 2:
        raise UsageError(f"expected two files, references then predictions (measure_scores.py REF SYS), got {bare}")
    flags = [a for a in argv if a.startswith("-")]
    return ["--ref_file", bare[0], "--pred_file", bare[1], *flags]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # METEOR's JVM is the slowest part: start it before anything else, so argument parsing and reading overlap it.
    meteor = MeteorProcess() if shutil.which("java") else None  # without Java, compute_scores says what to do
    with meteor or contextlib.nullcontext():
        from transformers import HfArgumentParser
        if "--output_json" in argv:  # its value is not a positional file
            i = argv.index("--output_json")
            argv = [*positional_files(argv[:i] + argv[i + 2:]), *argv[i:i + 2]]
        else:
            argv = positional_files(argv)
        parser = HfArgumentParser(EvalArguments, description=__doc__)
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        mteval = "python" if args.python else "perl"
        print(format_scores(score_files(args.ref_file, args.pred_file, args.output_json, meteor, mteval)))


if __name__ == "__main__":
    run_main(main)
