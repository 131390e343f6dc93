"""click parameter types the commands share (kept apart from cliutil, which must not load
click: npcapextract reaches its early connection to the service before click loads)."""

from __future__ import annotations

import click


class Number(click.FloatRange):
    """A FloatRange that also refuses nan, which every bound lets through (comparisons with
    it are false): a timeout of nan never fires, an interval of nan never ticks."""

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


class OptionalValue(click.Option):
    """An option whose value may be left out (`--compress` alone means `--compress 3`):
    click's optional value, with the value it stands for kept where a configuration file's
    reader can find it (index/config.py: a lone `--compress` line)."""

    def __init__(self, *args, alone: object, **kwargs):  # noqa: ANN002, ANN003 - click's
        super().__init__(*args, is_flag=False, flag_value=alone, **kwargs)
        self.alone = alone
