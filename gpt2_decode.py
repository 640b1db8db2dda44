"""Turn gpt2_beam.py's output into the files the E2E scorer reads, and optionally score them.

    python gpt2_decode.py --input_file ../shared/data/e2e/original/testset_w_refs.csv \
        --sample_file outputs/e2e/predict.jsonl \
        --output_ref_file outputs/e2e/e2e_ref.txt --output_pred_file outputs/e2e/e2e_pred.txt --score
    python gpt2_decode.py --vocab ./vocab --sample_file ./trained_models/GPT2_M/e2e/predict.5258.s200.jsonl \
        --input_file ./data/e2e/test_formatted.jsonl --output_ref_file ./trained_models/GPT2_M/e2e/e2e_ref.txt \
        --output_pred_file ./trained_models/GPT2_M/e2e/e2e_pred.txt      # microsoft/LoRA's command, as written

References are grouped per distinct meaning representation (one per line, groups separated by a blank line) and
predictions are written one per meaning representation in the same order -- the layout of the official
measure_scores.py. A prediction is cut at the end-of-text token and at its first blank line. With
--ref_type webnlg or dart, --output_ref_file is a folder of `reference0 ... reference{N-1}` files (one line per
input, empty where an input has fewer references), as microsoft/LoRA writes them for the GEM/DART scorers.

Samples are gpt2_beam.py's output in either format: ours ({"context", "text"}) or microsoft/LoRA's
({"id": input line, "predict": [token ids]}, decoded with the --vocab tokenizer; --input_file is then the text
file the token ids were encoded from, e.g. test_formatted.jsonl). Everything is read and checked before the first
file is written: a missing prediction, a context given two different predictions (microsoft/LoRA silently keeps
the last; --duplicates last does the same), or references that are all empty stop the run with one line.
"""
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import DataError, UsageError, atomic_write_text, check_not_input, one_line, read_json_lines, run_main
from e2e_data import group_references, is_token_data, load_e2e

END_OF_TEXT = "<|endoftext|>"
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


def clean_prediction(text):
    """The generated text up to the end-of-text token and the first blank line, on one line."""
    text = text.split(END_OF_TEXT, 1)[0]
    text = _BLANK_LINE.split(text, 1)[0]
    return one_line(text)


def post_process(text, lower=False, tokenize=False):
    """microsoft/LoRA gpt2_decode.py's --lower, then --tokenize (every non-word character a token of its own)."""
    if lower:
        text = text.lower()
    if tokenize:
        text = " ".join(" ".join(re.split(r"(\W)", text)).split())
    return text


def read_samples(path, rows, contexts, vocab=None, duplicates="error"):
    """{context: generated text} from gpt2_beam.py output: ours ({"context", "text"}, one line per distinct
    context) or microsoft/LoRA's ({"id": input line, "predict": [token ids]}, one line per input line, decoded
    with the --vocab tokenizer). A context given two different predictions is an error (or, with
    duplicates='last', microsoft/LoRA's behaviour: the last one counts)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sample file not found: {path}")
    lines = read_json_lines(path, "gpt2_beam.py output")
    if not lines:
        raise DataError(path, "holds no predictions")
    tokenizer = None
    samples, where = {}, {}
    for line_no, obj in lines:
        if "predict" in obj and "id" in obj:
            if tokenizer is None:
                tokenizer = _vocab(vocab, path)
            row_id = obj["id"]
            if not isinstance(row_id, int) or not 0 <= row_id < len(rows):
                raise DataError(path, f"id {row_id!r} is not a line of the input file ({len(rows)} lines); decode "
                                "the same input file", line_no)
            if not isinstance(obj["predict"], list) or not all(isinstance(t, int) for t in obj["predict"]):
                raise DataError(path, "`predict` must be a list of token ids", line_no)
            context, text = rows[row_id]["context"], tokenizer.decode(obj["predict"])
        elif "context" in obj and "text" in obj:
            context, text = obj["context"], obj["text"]
            if not isinstance(context, str) or not isinstance(text, str):
                raise DataError(path, "`context` and `text` must be strings", line_no)
        else:
            raise DataError(path, "expected gpt2_beam.py output: {\"context\", \"text\"} or microsoft/LoRA's "
                            "{\"id\", \"predict\"} objects", line_no)
        text = clean_prediction(text)
        if context in samples and samples[context] != text and duplicates == "error":
            raise DataError(path, f"a second, different prediction for context {context!r} (first at line "
                            f"{where[context]}); decode each context once, or pass --duplicates last", line_no)
        samples[context], where[context] = text, line_no
    return samples


def _vocab(vocab, sample_file):
    if vocab is None:
        raise UsageError(f"{sample_file} holds token ids (microsoft/LoRA's format): pass --vocab, the GPT-2 "
                         "vocabulary folder (e.g. ../shared/data/gpt2_vocab)")
    from e2e_data import load_tokenizer
    return load_tokenizer(vocab)


def write_decode_files(input_file, sample_file, output_ref_file, output_pred_file, ref_type="e2e", ref_num=4,
                       lower=False, mr_format="lora", vocab=None, duplicates="error", tokenize=False, keep="all"):
    """Write the reference and prediction files; returns the number of distinct meaning representations.
    Everything is read and checked before the first file is written."""
    for out in (output_ref_file, output_pred_file):
        check_not_input(out, input_file, sample_file)
    rows = load_e2e(input_file, mr_format)
    if is_token_data(rows):
        raise UsageError(f"{input_file} holds token ids: pass the text file they were encoded from "
                         "(e.g. test_formatted.jsonl), whose references the scorer needs")
    if keep != "all" and any("cate" not in row for row in rows):  # WebNLG: categories seen in training, or not
        raise UsageError(f"--filter {keep} needs the `cate` field of every line of {input_file} (WebNLG's "
                         "formatted JSONL has it)")
    contexts, refs = group_references([r for r in rows if keep == "all" or bool(r["cate"]) == (keep == "seen")])
    samples = read_samples(sample_file, rows, contexts, vocab, duplicates)
    missing = [c for c in contexts if c not in samples]
    if missing:
        raise UsageError(f"{sample_file} has no prediction for {len(missing)} of {len(contexts)} meaning "
                         f"representations of {input_file} (e.g. {missing[0]!r}); decode the same input file")
    predictions = [post_process(samples[c], lower, tokenize) for c in contexts]
    references = [[post_process(clean_prediction(r), lower, tokenize) for r in refs[c]] for c in contexts]
    empty = [c for c, group in zip(contexts, references, strict=True) if not any(group)]
    if empty:
        raise UsageError(f"{input_file}: {len(empty)} meaning representations have only empty references (e.g. "
                         f"{empty[0]!r}); score a file with references, e.g. testset_w_refs.csv")
    if ref_type != "e2e" and max(len(group) for group in references) > ref_num:
        raise UsageError(f"some inputs have more than --ref_num {ref_num} references; raise --ref_num")

    if ref_type == "e2e":
        # each group of references ends with a blank line, the last one too, as microsoft/LoRA writes them
        atomic_write_text(output_ref_file, "".join("".join(r + "\n" for r in group) + "\n" for group in references))
    else:  # webnlg / dart: one file per reference slot
        for slot in range(ref_num):
            atomic_write_text(Path(output_ref_file) / f"reference{slot}",
                              "".join((group[slot] if slot < len(group) else "") + "\n" for group in references))
    atomic_write_text(output_pred_file, "".join(p + "\n" for p in predictions))
    return len(contexts)


@dataclass
class DecodeArguments:
    input_file: str = field(metadata={"help": "the data that was decoded (.jsonl, official .csv or LoRA .txt)"})
    sample_file: str = field(metadata={"help": "gpt2_beam.py output JSONL"})
    output_ref_file: str = field(metadata={"help": "reference file to write (a folder for webnlg/dart)"})
    output_pred_file: str = field(metadata={"help": "prediction file to write"})
    ref_type: str = field(default="e2e", metadata={"help": "reference layout", "choices": ["e2e", "webnlg", "dart"]})
    ref_num: int = field(default=4, metadata={"help": "webnlg/dart: number of reference files"})
    lower: bool = field(default=False, metadata={"help": "lower-case references and predictions"})
    tokenize: bool = field(default=False, metadata={
        "help": "split off every non-word character as a token (microsoft/LoRA's WebNLG/DART decoding), after --lower"})
    filter: str = field(default="all", metadata={
        "help": "WebNLG: keep the inputs whose category was seen in training, the unseen ones, or all (the input "
                "file's `cate` field)", "choices": ["all", "seen", "unseen"]})
    mr_format: str = field(default="lora", metadata={
        "help": "CSV inputs: meaning-representation layout, as given to gpt2_beam.py", "choices": ["lora", "original"]})
    score: bool = field(default=False, metadata={"help": "score the files with e2e_eval.py (e2e only)"})
    score_json: str | None = field(default=None, metadata={
        "help": "with --score: where to write the scores (default: next to --output_pred_file)"})
    vocab: str | None = field(default=None, metadata={
        "help": "GPT-2 vocabulary folder, to decode microsoft/LoRA-format samples (token ids)"})
    duplicates: str = field(default="error", metadata={
        "help": "a context with two different predictions: error, or 'last' (microsoft/LoRA keeps the last)",
        "choices": ["error", "last"]})
    ref_unique_file: str | None = field(default=None, metadata={
        "help": "microsoft/LoRA's flag for WebNLG/DART reference ids; not supported here (an error says so)"})


def main(argv=None):
    from transformers import HfArgumentParser
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    (args,) = HfArgumentParser(DecodeArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.ref_unique_file:
        raise UsageError("--ref_unique_file is not supported: references are grouped by their context")
    if args.ref_num < 1:
        raise UsageError(f"--ref_num {args.ref_num} must be at least 1")
    if args.score and args.ref_type != "e2e":
        raise UsageError("--score runs the E2E metrics and needs --ref_type e2e; score webnlg/dart with their scripts")
    n = write_decode_files(args.input_file, args.sample_file, args.output_ref_file, args.output_pred_file,
                           args.ref_type, args.ref_num, args.lower, args.mr_format, args.vocab, args.duplicates,
                           args.tokenize, args.filter)
    print(f"wrote {n} predictions to {args.output_pred_file} and their references to {args.output_ref_file}")
    if args.score:
        import e2e_eval
        score_json = args.score_json or str(Path(args.output_pred_file).with_suffix(".scores.json"))
        scores = e2e_eval.score_files(args.output_ref_file, args.output_pred_file, score_json)
        print(e2e_eval.format_scores(scores))
        print(f"scores written to {score_json}")


if __name__ == "__main__":
    run_main(main)
