"""KFP cron expressions: six fields, seconds first, checked before anything is sent.

KFP's API server and its ScheduledWorkflow controller read schedules with robfig/cron v1
(``cron.Parse``): six fields, seconds first, or one of its descriptors. A classic five-field
crontab line is refused here with its six-field form spelled out instead of failing after
upload, and so is what the server would accept but never run: a date that does not exist
(``0 0 2 31 2 *``, February 31st) or an ``@every`` interval the scheduler would round.
"""

from __future__ import annotations

import dataclasses
import re

from imgclf.errors import ConfigError

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


@dataclasses.dataclass(frozen=True)
class _CronField:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    question_mark: bool = False

    def value(self, text: str, expr: str) -> int:
        upper = text.upper()
        if upper in self.names:
            return self.names.index(upper) + self.low
        if not text.isdigit():
            allowed = f"{self.low}-{self.high}"
            if self.names:
                allowed += f" or {self.names[0]}-{self.names[-1]}"
            raise ConfigError(
                f'--cron "{expr}": {self.name} value {text!r} is not a number ({allowed})'
            )
        number = int(text)
        if not self.low <= number <= self.high:
            raise ConfigError(
                f'--cron "{expr}": {self.name} value {number} is outside {self.low}-{self.high}'
            )
        return number


_CRON_FIELDS = (
    _CronField("seconds", 0, 59),
    _CronField("minutes", 0, 59),
    _CronField("hours", 0, 23),
    _CronField("day-of-month", 1, 31, question_mark=True),
    _CronField("month", 1, 12, _MONTHS),
    _CronField("day-of-week", 0, 6, _DAYS, question_mark=True),
)
_DAY_OF_MONTH, _MONTH = _CRON_FIELDS[3:5]
# robfig/cron's descriptors (matched case-sensitively there; normalised to lower case here).
_CRON_DESCRIPTORS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_EVERY = "@every"
# "@every <duration>" is read by Go's time.ParseDuration: these units, no days.
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# The most days each month can have (February: in leap years, which robfig's five-year search
# for the next run always reaches).
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _cron_part_values(part: str, field: _CronField, expr: str) -> set[int]:
    """The values of one comma-separated item: ``*``, ``?``, ``N``, ``A-B``, each optionally
    ``/STEP`` (``N/STEP`` runs from N to the field's maximum, as in robfig/cron)."""
    base, slash, step = part.partition("/")
    if slash and (not step.isdigit() or int(step) == 0):
        raise ConfigError(
            f'--cron "{expr}": {field.name} step {step!r} in {part!r} must be a positive integer'
        )
    every = int(step) if slash else 1
    if base == "?" and not field.question_mark:
        raise ConfigError(
            f'--cron "{expr}": "?" is only allowed in day-of-month and day-of-week, '
            f"not in {field.name}"
        )
    if base in ("*", "?"):
        return set(range(field.low, field.high + 1, every))
    low_text, dash, high_text = base.partition("-")
    if not low_text or (dash and not high_text):
        raise ConfigError(f'--cron "{expr}": {field.name} item {part!r} is not valid cron syntax')
    low = field.value(low_text, expr)
    high = field.value(high_text, expr) if dash else field.high if slash else low
    if low > high:
        raise ConfigError(
            f'--cron "{expr}": {field.name} range {base!r} runs backwards ({low} > {high})'
        )
    return set(range(low, high + 1, every))


def _every_day_of_week(text: str) -> bool:
    """True when robfig/cron treats the day-of-week field as ``*`` (an item ``*`` or ``?``).

    Then the day of month alone decides the day; any other day-of-week is OR-ed with the day
    of month, so some day always matches. ``*/2`` is left out on purpose: robfig versions
    differ on it, and a check that might refuse a schedule that runs must not guess.
    """
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base in ("*", "?") and step in ("", "1"):
            return True
    return False


def _check_fires(fields: list[str], values: list[set[int]], expr: str) -> None:
    """Refuse a schedule whose day of month exists in none of its months (``31 2``).

    KFP accepts it (it parses) and the recurring run then never starts, silently.
    """
    if not _every_day_of_week(fields[5]):
        return
    days, months = values[3], values[4]
    if any(day <= _DAYS_IN_MONTH[month - 1] for month in months for day in days):
        return
    raise ConfigError(
        f'--cron "{expr}" never fires: no {_MONTH.name} in {fields[4]!r} has a '
        f"{_DAY_OF_MONTH.name} in {fields[3]!r}"
    )


def _every_descriptor(expr: str, fields: list[str]) -> str:
    """``@every <duration>`` checked as robfig/cron will run it, normalised to one space.

    robfig/cron runs an interval under a second every second and drops fractions of a
    second, so only whole seconds from 1s up mean what they say.
    """
    example = '"@every 6h" or "@every 1h30m"'
    if len(fields) != 2:
        raise ConfigError(f'--cron "{expr}": @every takes one Go duration, e.g. {example}')
    text = fields[1]
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(
            f'--cron "{expr}": {text!r} is not a positive Go duration (numbers with units h, '
            f"m, s, ms, us, ns and no days), e.g. {example}"
        )
    seconds = sum(float(number) * _GO_UNIT_SECONDS[unit] for number, unit in parts)
    if seconds < 1 or abs(seconds - round(seconds)) > 1e-9:
        raise ConfigError(
            f'--cron "{expr}": the interval {text} must be a whole number of seconds, at '
            "least 1s: KFP's scheduler would round it"
        )
    return f"{_EVERY} {text}"


def _descriptor(expr: str, fields: list[str]) -> str:
    """A robfig/cron descriptor (``@daily``, ``@every 1h``), or ConfigError naming it."""
    word = fields[0].lower()
    if word == _EVERY:
        return _every_descriptor(expr, fields)
    if word in _CRON_DESCRIPTORS and len(fields) == 1:
        return word
    if word in _CRON_DESCRIPTORS:
        raise ConfigError(f'--cron "{expr}": {word} takes nothing after it')
    raise ConfigError(
        f'--cron "{expr}": KFP\'s scheduler does not take {fields[0]}; it takes '
        f'{", ".join(sorted(_CRON_DESCRIPTORS))}, "@every <duration>" or six fields, '
        'seconds first, e.g. "0 0 2 * * *" for 02:00 daily'
    )


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression and return it with single spaces.

    KFP's scheduler takes six fields, seconds first (``"0 0 2 * * *"`` is 02:00 every day);
    a classic five-field crontab line would silently mean something else (``"0 2 * * *"``
    read as six fields is missing one and is rejected by the server only after upload), so
    it is refused here with the six-field form spelled out. The descriptors of robfig/cron
    (``@daily``, ``@every 6h``...) are accepted; other ``@`` words (``@reboot``) are refused,
    and so is a schedule that can never fire.
    """
    fields = expr.split()
    if fields and fields[0].startswith("@"):
        return _descriptor(expr, fields)
    if len(fields) == 5:
        six = " ".join(["0", *fields])
        raise ConfigError(f'--cron "{expr}" has 5 fields; KFP expects 6 (seconds first): "{six}"')
    if len(fields) != 6:
        raise ConfigError(
            f'--cron "{expr}" has {len(fields)} fields; KFP expects 6 (seconds first): '
            '"SEC MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK", e.g. "0 0 2 * * *" for 02:00 daily'
        )
    values = []
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        found: set[int] = set()
        for part in text.split(","):
            if not part:
                raise ConfigError(f'--cron "{expr}": empty item in {field.name} {text!r}')
            found |= _cron_part_values(part, field, expr)
        values.append(found)
    _check_fires(fields, values, expr)
    return " ".join(fields)
