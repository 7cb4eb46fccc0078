"""The ``t2i-fast`` command line: a click group; each module adds its commands."""

from __future__ import annotations

import click

from t2i_fast import __version__
from t2i_fast.config import FieldError
from t2i_fast.errors import T2IError


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


class _Group(click.Group):
    """Shows bad input (T2IError) as one ``Error:`` line and exit status 1, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FieldError as exc:  # a configuration field is the option of the same name
            problem = exc.problem
            for name in exc.related:
                problem = problem.replace(name, _flag(name))
            raise click.ClickException(f"{_flag(exc.field)} {problem}") from exc
        except T2IError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "show_default": True, "max_content_width": 100})
@click.version_option(__version__, prog_name="t2i-fast")
def main() -> None:
    """t2i-fast: text-to-image GANs (Reed et al., ICML 2016), trained fast."""


def _register() -> None:
    from t2i_fast.cli.data import info, preview, stream
    from t2i_fast.cli.eval import eval_group
    from t2i_fast.cli.prepare import prepare
    from t2i_fast.cli.report import report
    from t2i_fast.cli.sample import interpolate, sample
    from t2i_fast.cli.style import style_transfer_command, train_style_command
    from t2i_fast.cli.train import pretrain_text_command, train_command

    for command in (prepare, info, preview, stream, pretrain_text_command, train_command,
                    sample, interpolate, eval_group, train_style_command,
                    style_transfer_command, report):
        main.add_command(command)


_register()
