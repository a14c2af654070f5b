#!/usr/bin/env python
"""Convert a dataset into megatron_trapo records (problem, answer, expert solutions), with a
report of skipped rows.

    python tools/prepare_data.py --format openr1 --input openr1.parquet --output train.jsonl \
        --tokenizer Qwen2.5-Math-7B --max-prompt-length 1024
    python tools/prepare_data.py --format luffy --input openr1_46k.parquet --output train.jsonl
    python tools/prepare_data.py --format luffy --input openr1_46k.parquet --output train.jsonl \
        --second-trace OpenR1-Math-220k/data      # + a second verified trace per problem
    python tools/prepare_data.py --format gsm8k --input gsm8k.jsonl --output train.jsonl
    python tools/prepare_data.py --format gsm8k --input openai/gsm8k --dataset-config main \
        --split train --output train.jsonl     # a hub name: needs the network or the cache
    python tools/prepare_data.py --format math --input ./MATH_saved_to_disk --split test \
        --output math.jsonl
    python tools/prepare_data.py --format jsonl --input my.jsonl --output train.jsonl \
        --field-map problem=question answer=final solutions=traces
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", required=True,
                    choices=["openr1", "luffy", "gsm8k", "math", "jsonl"])
    ap.add_argument("--input", required=True,
                    help=".parquet or .jsonl file, a Hugging Face dataset folder (save_to_disk, "
                         "data files, a repo clone) or a hub dataset name")
    ap.add_argument("--split", default=None, help="the split of a Hugging Face dataset")
    ap.add_argument("--dataset-config", default=None, help="a Hugging Face dataset's config name")
    ap.add_argument("--output", required=True, help=".jsonl or .parquet")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer folder, for the length limit")
    ap.add_argument("--max-prompt-length", type=int, default=1024)
    ap.add_argument("--field-map", nargs="*", default=[], help="ours=theirs for --format jsonl")
    ap.add_argument("--report", default=None, help="report JSON (default: OUTPUT.report.json)")
    ap.add_argument("--second-trace", default=None, metavar="OPENR1",
                    help="OpenR1-Math-220k rows (file, folder or hub name): each record with one "
                         "trace gets the first verified generation of the same problem (matched "
                         "by normalised text) that differs from it, for TRAPO's last micro-group")
    ap.add_argument("--second-trace-split", default=None, help="the split of --second-trace")
    args = ap.parse_args()

    from megatron_trapo.config import ConfigError
    from megatron_trapo.data.convert import convert_rows
    from megatron_trapo.data.records import save_records

    try:
        rows = load_rows(args.input, args.split, args.dataset_config, "--input")
        mapping = dict(kv.split("=", 1) for kv in args.field_map)
        length = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            from megatron_trapo.data.prompts import render_prompt

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            length = lambda problem: len(tok(render_prompt(tok, problem))["input_ids"])  # noqa: E731
        records, report = convert_rows(rows, args.format, mapping, length,
                                       args.max_prompt_length if length else None)
        merged = None
        if args.second_trace:
            from megatron_trapo.data.second_trace import merge_second_traces

            openr1, _ = convert_rows(load_rows(args.second_trace, args.second_trace_split, None,
                                               "--second-trace"), "openr1")
            records, merged = merge_second_traces(records, openr1)
    except (ConfigError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    save_records(records, args.output)
    rep = report.as_dict()
    if merged is not None:
        rep["second_trace"] = merged.as_dict()
        print(f"prepare_data: {merged.got_second} of {merged.records} problems got a second "
              f"trace ({merged.had_two} had two already, {merged.matched_without_new} matched "
              f"with no other verified trace, {merged.unmatched} unmatched)", file=sys.stderr)
    Path(args.report or f"{args.output}.report.json").write_text(json.dumps(rep, indent=2))
    print(json.dumps(rep))
    return 0


def load_rows(source: str, split, config, flag: str):
    """Rows of a file, a dataset folder or a hub name."""
    from megatron_trapo.config import ConfigError
    from megatron_trapo.data.records import read_rows

    path = Path(source)
    if path.is_file():
        return read_rows(path)
    if path.is_dir() or not path.suffix:  # a dataset folder, or a hub name
        from megatron_trapo.data.hf_datasets import load_hf_rows  # lazy: datasets, ~1 s

        return load_hf_rows(source, split, config)
    raise ConfigError(f"{flag} {path}: no such file")


if __name__ == "__main__":
    sys.exit(main())
