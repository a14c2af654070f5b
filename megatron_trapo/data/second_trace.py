"""A second expert trace per problem (fidelity review D2): TRAPO's last micro-group is guided by
trace 1 (``sampler.trace_index``), and the reference trains on records with two verified traces.
The LUFFY/OpenR1 46k set carries one; OpenR1-Math-220k holds up to four verified generations of
the same problems. :func:`merge_second_traces` adds, to each record with a single trace, the
first verified OpenR1 generation of the same problem that is not that trace."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from megatron_trapo.data.records import Record

_SPACE = re.compile(r"\s+")


def match_key(text: str) -> str:
    """A text for matching across datasets (problems; traces against traces): Unicode-
    normalised (NFKC), lower case, with no whitespace (the two sets wrap and indent the same
    problems differently)."""
    return _SPACE.sub("", unicodedata.normalize("NFKC", text)).lower()


@dataclass
class MergeReport:
    records: int = 0  # records read
    had_two: int = 0  # records that already had two traces or more
    got_second: int = 0  # records that got a second trace
    matched_without_new: int = 0  # matched a problem whose verified traces are all the first
    unmatched: int = 0  # no OpenR1 problem with the same text

    def as_dict(self) -> dict:
        return dict(vars(self))


def merge_second_traces(records: Sequence[Record], openr1: Sequence[Record]
                        ) -> Tuple[List[Record], MergeReport]:
    """``records`` with a second trace from ``openr1`` (records converted with
    ``--format openr1``: their solutions are the verified generations) where one matches."""
    traces: Dict[str, List[str]] = {}
    for r in openr1:
        traces.setdefault(match_key(r.problem), []).extend(r.solutions)
    report, out = MergeReport(records=len(records)), []
    for r in records:
        if len(r.solutions) >= 2:
            report.had_two += 1
            out.append(r)
            continue
        candidates = traces.get(match_key(r.problem))
        if candidates is None:
            report.unmatched += 1
            out.append(r)
            continue
        first = {match_key(s) for s in r.solutions}
        new = next((s for s in candidates if s.strip() and match_key(s) not in first), None)
        if new is None:
            report.matched_without_new += 1
            out.append(r)
            continue
        report.got_second += 1
        out.append(Record(r.problem, r.answer, [*r.solutions, new], r.id, r.source))
    return out, report
