"""What a caller prefers: `Prefer: wait=N` (RFC 7240) and the media types it accepts (RFC 9110 section 12.5.1)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

JSON = "application/json"
WAIT = re.compile(r"[0-9]{1,40}(\.[0-9]{1,40})?")  # ASCII digits only (str.isdigit and float() take others)
# the pieces of a header value: a quoted string (which may hold commas; one left open runs to the end), other
# text, or a comma. Each character is read once: no backtracking, however the value is made.
MAX_PARSED = 4096  # characters of a header's values read; the rest is ignored
PIECE = re.compile(r'"(?:[^"\\]|\\.)*"?|[^,"]+|,')


def _items(values: list[str]) -> list[str]:
    """The comma-separated elements of every value of a header (RFC 9110 section 5.6.1), empty ones dropped;
    only the elements within the first MAX_PARSED characters of the values are read (a real Prefer or Accept
    is far shorter; one cut short is dropped)."""
    items: list[str] = []
    budget = MAX_PARSED
    for value in values:
        if len(value) > budget:
            value = value[:value.rfind(",", 0, budget) + 1]  # up to the last comma within the budget
        budget -= len(value)
        item: list[str] = []
        for piece in PIECE.findall(value):
            if piece == ",":
                items.append("".join(item).strip())
                item = []
            else:
                item.append(piece)
        items.append("".join(item).strip())
    return [i for i in items if i]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def preferences(values: list[str]) -> dict[str, str]:
    """Every Prefer header as {lower-case name: value}; the first of each name counts, parameters after ";"
    are ignored, and a preference given without a value has "" (RFC 7240 section 2)."""
    out: dict[str, str] = {}
    for item in _items(values):
        name, _, value = item.split(";", 1)[0].partition("=")
        if name.strip():
            out.setdefault(name.strip().lower(), _unquote(value))
    return out


def wait_preference(prefer: list[str], query: str | None, cap: float) -> tuple[float, str] | None:
    """(seconds to wait, the Preference-Applied value) from ?wait=N or Prefer: wait=N (the query wins);
    None when neither asks to wait. N above `cap` is capped. Raises ValueError naming what is wrong."""
    source = "?wait=" if query is not None else "Prefer: wait="
    raw = query if query is not None else preferences(prefer).get("wait")
    if raw is None:
        return None
    if not WAIT.fullmatch(raw.strip()) or float(raw) <= 0:
        raise ValueError(f"{source} takes a number of seconds greater than 0 (at most {cap:g} is applied), "
                         f"got {raw[:20]!r}")
    seconds = min(float(raw), cap)
    shown = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return seconds, f"wait={shown}"


@dataclass(frozen=True)
class MediaRange:
    """One element of Accept: type/subtype, its weight and where it stands in the header."""

    kind: str
    sub: str
    q: float
    order: int

    def specificity(self, ctype: str, any_bytes: bool) -> int:
        """How closely this range names a content type: 3 exactly, 2 by its type (with any_bytes,
        application/octet-stream counts so for any type: "the bytes, whatever they are"), 1 as */*; 0 when
        it does not match."""
        kind, _, sub = ctype.partition("/")
        if (self.kind, self.sub) == (kind, sub):
            return 3
        if (self.kind == kind and self.sub == "*") or \
                (any_bytes and (self.kind, self.sub) == ("application", "octet-stream")):
            return 2
        return 1 if (self.kind, self.sub) == ("*", "*") else 0


class Accept:
    """The media ranges a caller accepts, to choose between the job document and one output's bytes."""

    def __init__(self, header: str | None) -> None:
        self.ranges: list[MediaRange] = []
        for order, item in enumerate(_items([header or ""])):
            mtype, *params = item.split(";")
            kind, slash, sub = mtype.strip().lower().partition("/")
            if not slash or not kind or not sub or (kind == "*" and sub != "*"):
                continue  # not a media range: ignored
            q = 1.0
            for param in params:
                name, _, value = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = float(_unquote(value))
                    except ValueError:
                        q = -1.0
            if 0.0 <= q <= 1.0 and math.isfinite(q):
                self.ranges.append(MediaRange(kind, sub, q, order))
        self._json = self.match(JSON, outputs=False)

    def match(self, ctype: str, outputs: bool = True) -> MediaRange | None:
        """The most specific range that matches a content type (the first of equally specific ones)."""
        ctype = ctype.split(";", 1)[0].strip().lower()
        best: MediaRange | None = None
        top = 0
        for r in self.ranges:
            level = r.specificity(ctype, outputs)
            if level > top:
                best, top = r, level
        return best

    def _beats_json(self, r: MediaRange) -> bool:
        j = self._json
        if r.q <= 0 or r == j:
            return False
        return j is None or r.q > j.q or (r.q == j.q and r.order < j.order)

    @property
    def json_ok(self) -> bool:
        """True when the job document is acceptable (no Accept, */*, application/json ...)."""
        return not self.ranges or (self._json is not None and self._json.q > 0)

    def bytes_first(self) -> bool:
        """True when some type other than JSON is preferred to it: the caller asks for an output's bytes."""
        return any(self._beats_json(r) for r in self.ranges if (r.kind, r.sub) != ("application", "json"))

    def output(self, content_types: list[str]) -> int | None:
        """The index of the output to answer with instead of the document: the one whose type the caller weighs
        highest, the first of equals; None when none is preferred to the document."""
        best: tuple[float, int, int] | None = None
        for index, ctype in enumerate(content_types):
            r = self.match(ctype)
            if r is not None and self._beats_json(r) and (best is None or (r.q, -r.order) > best[:2]):
                best = (r.q, -r.order, index)
        return best[2] if best is not None else None
