"""Thin typer front end over `ditf_pipeline`."""

import typer

app = typer.Typer(help="DiTF: Diffusion Transformer Features for correspondence.", no_args_is_help=True)


def main() -> None:
    app()
