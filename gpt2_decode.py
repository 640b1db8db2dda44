"""Turn gpt2_beam.py's output into the files the E2E scorer reads, and optionally score them.

    python gpt2_decode.py --input_file ../shared/data/e2e/original/testset_w_refs.csv \
        --sample_file outputs/e2e/predict.jsonl \
        --output_ref_file outputs/e2e/e2e_ref.txt --output_pred_file outputs/e2e/e2e_pred.txt --score

References are grouped per distinct meaning representation (one per line, groups separated by a blank line) and
predictions are written one per meaning representation in the same order -- the layout of the official
measure_scores.py. A prediction is cut at the end-of-text token and at its first blank line. With
--ref_type webnlg or dart, --output_ref_file is a folder of `reference0 ... reference{N-1}` files (one line per
input, empty where an input has fewer references), as microsoft/LoRA writes them for the GEM/DART scorers.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common import UsageError, atomic_write_text, run_main
from e2e_data import group_references, load_e2e, read_json_lines

END_OF_TEXT = "<|endoftext|>"
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


def clean_prediction(text):
    """The generated text up to the end-of-text token and the first blank line, on one line."""
    text = text.split(END_OF_TEXT, 1)[0]
    text = _BLANK_LINE.split(text, 1)[0]
    return " ".join(text.split())


def one_line(text):
    return " ".join(text.split())


def read_samples(path):
    """gpt2_beam.py output: one JSON object a line with `context` and `text` (and `id`, `token_ids`)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sample file not found: {path}")
    return {row["context"]: row["text"] for row in read_json_lines(path, ["context", "text"], "gpt2_beam.py output")}


def write_decode_files(input_file, sample_file, output_ref_file, output_pred_file, ref_type="e2e", ref_num=4,
                       lower=False, mr_format="lora"):
    """Write the reference and prediction files; returns the number of distinct meaning representations."""
    contexts, refs = group_references(load_e2e(input_file, mr_format))
    samples = read_samples(sample_file)
    missing = [c for c in contexts if c not in samples]
    if missing:
        raise UsageError(f"{sample_file} has no prediction for {len(missing)} of {len(contexts)} meaning "
                         f"representations of {input_file} (e.g. {missing[0]!r}); decode the same input file")
    case = str.lower if lower else str
    predictions = [case(clean_prediction(samples[c])) for c in contexts]
    references = [[case(one_line(r)) for r in refs[c]] for c in contexts]

    atomic_write_text(output_pred_file, "".join(p + "\n" for p in predictions))
    if ref_type == "e2e":
        atomic_write_text(output_ref_file, "\n".join("".join(r + "\n" for r in group) for group in references))
    else:  # webnlg / dart: one file per reference slot
        if max(len(group) for group in references) > ref_num:
            raise UsageError(f"some inputs have more than --ref_num {ref_num} references; raise --ref_num")
        for slot in range(ref_num):
            atomic_write_text(Path(output_ref_file) / f"reference{slot}",
                              "".join((group[slot] if slot < len(group) else "") + "\n" for group in references))
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
    mr_format: str = field(default="lora", metadata={
        "help": "CSV inputs: meaning-representation layout, as given to gpt2_beam.py", "choices": ["lora", "original"]})
    score: bool = field(default=False, metadata={"help": "score the files with e2e_eval.py (e2e only)"})
    score_json: Optional[str] = field(default=None, metadata={
        "help": "with --score: where to write the scores (default: next to --output_pred_file)"})


def main():
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(DecodeArguments).parse_args_into_dataclasses()
    if args.score and args.ref_type != "e2e":
        raise UsageError("--score runs the E2E metrics and needs --ref_type e2e; score webnlg/dart with their scripts")
    n = write_decode_files(args.input_file, args.sample_file, args.output_ref_file, args.output_pred_file,
                           args.ref_type, args.ref_num, args.lower, args.mr_format)
    print(f"wrote {n} predictions to {args.output_pred_file} and their references to {args.output_ref_file}")
    if args.score:
        import e2e_eval
        score_json = args.score_json or str(Path(args.output_pred_file).with_suffix(".scores.json"))
        scores = e2e_eval.score_files(args.output_ref_file, args.output_pred_file, score_json)
        print(e2e_eval.format_scores(scores))
        print(f"scores written to {score_json}")


if __name__ == "__main__":
    run_main(main)
