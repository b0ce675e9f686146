"""One part of the report that cannot be made (a table, a section of report.md, a figure) is left out, never the
whole report: its error becomes one line on stderr and one in report.md, naming the part and why, and everything
else is written.

    sections = Sections()
    advice = sections.attempt("rank advice (tables/rank_advice.csv)", lambda: rank_advice_table(...), fallback)
    lines += sections.lines()    # report.md: "## Parts left out (1)", "- rank advice ...: ZeroDivisionError: ..."

An OSError is not caught: a full disk or an --out that went away is the report's problem, which analysis.report's main
names in its one `error:` line, not a part's.
"""
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

MAX_REASON = 300  # characters of an error message kept in its one line
PACKAGE = Path(__file__).resolve().parent


def failure(e: BaseException) -> str:
    """One line saying why a part failed: the exception, its message and the deepest line of analysis/ it passed
    through ('ZeroDivisionError: float division by zero (analysis/intrinsic_dim.py:98)')."""
    message = " ".join(str(e).split())
    message = message if len(message) <= MAX_REASON else message[:MAX_REASON - 1] + "…"
    ours = [(Path(f.filename).resolve(), f.lineno) for f in traceback.extract_tb(e.__traceback__)]
    ours = [(path, line) for path, line in ours if path.is_relative_to(PACKAGE)]
    where = f" ({ours[-1][0].relative_to(PACKAGE.parent).as_posix()}:{ours[-1][1]})" if ours else ""
    return f"{type(e).__name__}" + (f": {message}" if message else "") + where


@dataclass
class Sections:
    """The parts of one report that were left out, with why, in the order they failed."""
    skipped: list = field(default_factory=list)  # [(part, reason)]

    def attempt(self, part: str, make, fallback=None):
        """make(), or `fallback` where it raises (not OSError): the part is left out, said on stderr now and in
        report.md by lines()."""
        try:
            return make()
        except OSError:
            raise
        except Exception as e:  # any error of one part: the rest of the report does not depend on it
            self.skip(part, failure(e))
            return fallback

    def skip(self, part: str, reason: str) -> None:
        self.skipped.append((part, reason))
        print(f"analysis: {part} left out: {reason}", file=sys.stderr, flush=True)

    def lines(self) -> list[str]:
        """report.md's list of the parts left out (nothing when none was)."""
        if not self.skipped:
            return []
        return [f"## Parts left out ({len(self.skipped)})", "",
                "Each raised an error while the report was made; everything else was written.", ""] + [
            f"- {part}: {reason}" for part, reason in self.skipped] + [""]
