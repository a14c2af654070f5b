#!/usr/bin/env python
"""Convert a dataset into megatron_trapo records (problem, answer, expert solutions), with a
report of skipped rows.

    python tools/prepare_data.py --format openr1 --input openr1.parquet --output train.jsonl \
        --tokenizer Qwen2.5-Math-7B --max-prompt-length 1024
    python tools/prepare_data.py --format luffy --input openr1_46k.parquet --output train.jsonl
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
    args = ap.parse_args()

    from megatron_trapo.config import ConfigError
    from megatron_trapo.data.convert import convert_rows
    from megatron_trapo.data.records import read_rows, save_records

    try:
        path = Path(args.input)
        if path.is_file():
            rows = read_rows(path)
        elif path.is_dir() or not path.suffix:  # a dataset folder, or a hub name
            from megatron_trapo.data.hf_datasets import load_hf_rows  # lazy: datasets, ~1 s

            rows = load_hf_rows(args.input, args.split, args.dataset_config)
        else:
            raise ConfigError(f"--input {path}: no such file")
        mapping = dict(kv.split("=", 1) for kv in args.field_map)
        length = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            from megatron_trapo.data.prompts import render_prompt

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            length = lambda problem: len(tok(render_prompt(tok, problem))["input_ids"])  # noqa: E731
        records, report = convert_rows(rows, args.format, mapping, length,
                                       args.max_prompt_length if length else None)
    except (ConfigError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    save_records(records, args.output)
    rep = report.as_dict()
    Path(args.report or f"{args.output}.report.json").write_text(json.dumps(rep, indent=2))
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
