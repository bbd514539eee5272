"""KFP cron expressions: six fields, seconds first, checked before anything is sent.

KFP's scheduler (robfig/cron) reads six fields, seconds first; a classic five-field crontab
line is refused here with its six-field form spelled out instead of failing after upload.
"""

from __future__ import annotations

import dataclasses

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
_CRON_DESCRIPTORS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


def _check_cron_part(part: str, field: _CronField, expr: str) -> None:
    """One comma-separated item: ``*``, ``?``, ``N``, ``A-B``, each optionally ``/STEP``."""
    base, slash, step = part.partition("/")
    if slash and (not step.isdigit() or int(step) == 0):
        raise ConfigError(
            f'--cron "{expr}": {field.name} step {step!r} in {part!r} must be a positive integer'
        )
    if base == "*":
        return
    if base == "?":
        if not field.question_mark:
            raise ConfigError(
                f'--cron "{expr}": "?" is only allowed in day-of-month and day-of-week, '
                f"not in {field.name}"
            )
        return
    low_text, dash, high_text = base.partition("-")
    if not low_text or (dash and not high_text):
        raise ConfigError(f'--cron "{expr}": {field.name} item {part!r} is not valid cron syntax')
    low = field.value(low_text, expr)
    if dash:
        high = field.value(high_text, expr)
        if low > high:
            raise ConfigError(
                f'--cron "{expr}": {field.name} range {base!r} runs backwards ({low} > {high})'
            )


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression and return it with single spaces.

    KFP's scheduler takes six fields, seconds first (``"0 0 2 * * *"`` is 02:00 every day);
    a classic five-field crontab line would silently mean something else (``"0 2 * * *"``
    read as six fields is missing one and is rejected by the server only after upload), so
    it is refused here with the six-field form spelled out. The ``@daily``-style
    descriptors of robfig/cron are accepted as they are.
    """
    fields = expr.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_DESCRIPTORS:
        return fields[0].lower()
    if len(fields) == 5:
        six = " ".join(["0", *fields])
        raise ConfigError(f'--cron "{expr}" has 5 fields; KFP expects 6 (seconds first): "{six}"')
    if len(fields) != 6:
        raise ConfigError(
            f'--cron "{expr}" has {len(fields)} fields; KFP expects 6 (seconds first): '
            '"SEC MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK", e.g. "0 0 2 * * *" for 02:00 daily'
        )
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            if not part:
                raise ConfigError(f'--cron "{expr}": empty item in {field.name} {text!r}')
            _check_cron_part(part, field, expr)
    return " ".join(fields)
